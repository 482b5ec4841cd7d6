#!/usr/bin/env bash
# Issue 18's check (S=scratch/families by default): "done when": vdm-train (few steps), vdm-export (validated) and vdm-explain per family, offline.
set -u
cd "$(dirname "$0")/.."

export VDM_GATES_HOME=$(mktemp -d) HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
S=${S:-scratch/families}; rm -rf $S; mkdir -p $S; export S
python - <<'PY'
import os, sys; sys.path.insert(0, "tests/families")
from pathlib import Path
from family_models import FAMILIES, save_model
for k in FAMILIES: save_model(k, Path(os.environ["S"])/k)
from PIL import Image; import numpy as np
Image.fromarray(np.random.default_rng(0).integers(0,256,(40,48,3),dtype=np.uint8)).save(os.environ["S"] + "/img.png")
PY
for k in deit dinov2 dinov2_with_registers beit data2vec-vision clip; do
  L=""; [ $k = clip ] && L="--labels cat,dog,car,tree,boat"
  echo "=== $k"
  vdm-train --model $S/$k --data digits --out $S/run-$k --steps 4 --batch-size 8 --eval-interval 2 --checkpoint-interval 2 --val-size 16 --no-register --no-progress $L > $S/$k.train.log 2>&1; echo "train rc=$? $(tail -1 $S/$k.train.log)"
  vdm-export --model $S/$k --gates $S/run-$k/gates --out $S/$k.onnx > $S/$k.export.log 2>&1; echo "export rc=$? $(grep -i -m3 'valid\|max' $S/$k.export.log | tr '\n' ' ')"
  vdm-explain $S/img.png --model $S/$k --gates $S/run-$k/gates --out $S/explain-$k > $S/$k.explain.log 2>&1; echo "explain rc=$? $(ls $S/explain-$k | tr '\n' ' ')"
done
