# Sourced by the other scripts: make (once) and enter the project's virtual environment.
# Idempotent: a second run only checks that the installed packages still match pyproject.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${MMCL_VENV:-.venv}"
# The one system package: the text-to-speech engine that `mmcl prep spoken-digits` speaks digits with.
if ! command -v espeak-ng >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; }
    else
        echo "note: espeak-ng is missing (needed by 'mmcl prep spoken-digits'): sudo apt-get install espeak-ng" >&2
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# DeepSpeed compiles a small communication op on first use: keep it with the environment.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}"
stamp="$VENV/.mmcl-installed-$(cat pyproject.toml | python -c 'import hashlib,sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:12])')-${1:-base}"
if [ ! -f "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e ".${2:-}"
    touch "$stamp"
fi
