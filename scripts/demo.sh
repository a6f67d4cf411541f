#!/usr/bin/env bash
# The demo: install, write the digits shards, train the tiny towers, evaluate zero-shot on held-out digits.
source "$(dirname "$0")/env.sh" base
[ -f data/digits/train/sizes.json ] || mmcl prep digits --out data/digits
# run.resume=latest: a second demo run continues (here: re-evaluates) the finished run instead of failing.
mmcl train configs/digits.yaml run.resume=latest
python - <<'PY'
import json
result = json.load(open("runs/digits/eval.json"))["digits"]
print(f"\nzero-shot top-1 on {result['samples']} held-out digits: {100 * result['top1']:.1f}% (chance: 10%)")
PY
