"""bench/gpu_check.py, the first command on a GPU node, runs its checks end to end on 2 CPU processes."""

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_check_runs_its_checks_on_two_cpu_processes(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--steps",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert set(checks) == {"train", "resume", "learns", "throughput"} and all(c["ok"] for c in checks.values())
    assert "same samples: True" in checks["resume"]["detail"]
    assert any("ratio mmcl/open_clip" in line for line in checks["throughput"]["detail"])
    assert "PASS  resume" in result.stdout
