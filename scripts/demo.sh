#!/usr/bin/env bash
# The demo: install, write the bundled shards, train tiny towers, evaluate zero-shot on held-out data.
#   bash scripts/demo.sh           image + text + audio towers on handwritten and spoken digits (~10 min)
#   bash scripts/demo.sh digits    image + text towers on handwritten digits (~3 min)
source "$(dirname "$0")/env.sh" base
demo="${1:-spoken_digits}"
case "$demo" in
    digits) [ -f data/digits/train/sizes.json ] || mmcl prep digits --out data/digits ;;
    spoken_digits) [ -f data/spoken_digits/train/audio_text/sizes.json ] || mmcl prep spoken-digits --out data/spoken_digits ;;
    *) echo "unknown demo '$demo': digits or spoken_digits" >&2; exit 2 ;;
esac
# run.resume=latest: a second demo run continues (here: re-evaluates) the finished run instead of failing.
mmcl train "configs/$demo.yaml" run.resume=latest
DEMO="$demo" python - <<'PY'
import json, os
demo = os.environ["DEMO"]
result = json.load(open(f"runs/{demo}/eval.json"))[demo]
print(f"\nzero-shot on {result['samples']} held-out digits (chance: 10% top-1):")
print(f"  image top-1: {100 * result['acc1']:.1f}%")
if "audio_acc1" in result:
    print(f"  audio top-1 (voices never heard in training): {100 * result['audio_acc1']:.1f}%")
    print(f"  image->audio R@1: {100 * result['image_to_audio_recall@1']:.1f}%, "
          f"audio->image R@1: {100 * result['audio_to_image_recall@1']:.1f}% (never paired in training)")
PY
