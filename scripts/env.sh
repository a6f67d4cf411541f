# Sourced by the other scripts: make (once) and enter the project's virtual environment.
# Idempotent: a second run only checks that the installed packages still match pyproject.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${MMCL_VENV:-.venv}"
# System packages for the bundled real sets: espeak-ng speaks the spoken digits; the Open Clip Art
# Library's drawings (SVG, with their authors' titles and keywords) and librsvg's rasteriser.
missing=""
command -v espeak-ng >/dev/null || missing="$missing espeak-ng"
command -v rsvg-convert >/dev/null || missing="$missing librsvg2-bin"
[ -d /usr/share/openclipart/svg ] || missing="$missing openclipart-svg"
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; }
    else
        echo "note: missing system packages (for 'mmcl prep spoken-digits' / 'openclipart'): sudo apt-get install$missing" >&2
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
