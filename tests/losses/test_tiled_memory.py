"""infonce_tiled keeps memory linear in the batch: at a batch where the B x B logits dominate, its peak
memory (forward + backward, measured in a fresh process) stays a small fraction of the plain loss's."""

import json
import subprocess
import sys

import pytest

BATCH, DIM, TILE = 8192, 32, 256  # the logits: 8192^2 floats = 256 MiB; the inputs: 2 MiB
MEASURE = r"""
import json, re, sys
import torch
import torch.nn.functional as F
from mmcl.config import LossConfig
from mmcl.losses import build_loss

name, batch, dim, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
a = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_(True)
b = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_(True)
scale = torch.tensor(14.0, requires_grad=True)
if name != "inputs":
    loss = build_loss(LossConfig(name=name, chunk_size=tile))({"image": a, "text": b}, scale)["loss"]
    loss.backward()
# The peak resident set of this process image: VmHWM starts afresh at exec (ru_maxrss would carry over
# the forking parent's peak).
status = open("/proc/self/status").read()
print(json.dumps(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024))
"""


def peak_bytes(name: str, tile: int = TILE) -> int:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, name, str(BATCH), str(DIM), str(tile)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def peaks():
    return {name: peak_bytes(name) for name in ("inputs", "infonce", "infonce_tiled")}


def test_tiled_infonce_peaks_under_a_fifth_of_the_plain_loss(peaks):
    plain = peaks["infonce"] - peaks["inputs"]
    tiled = peaks["infonce_tiled"] - peaks["inputs"]
    logits = BATCH * BATCH * 4
    assert plain > 2 * logits  # the plain loss does hold B x B matrices: the logits dominate its memory
    assert tiled < 0.2 * plain, f"tiled {tiled / 2**20:.0f} MiB, plain {plain / 2**20:.0f} MiB"
