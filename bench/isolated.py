"""Run one measurement in a fresh Python process, so its peak memory is its own."""

from __future__ import annotations

import json
import subprocess
import sys


def run_isolated(module: str, *args: object) -> dict:
    """`module.measure(*args)` (a module beside this file) in a new process; its dict, or {"error": ...}."""
    code = (
        f"import json, sys; sys.path.insert(0, {sys.path[0]!r}); from {module} import measure; "
        f"print(json.dumps(measure(*{args!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:100]}
    return json.loads(result.stdout.strip().splitlines()[-1])
