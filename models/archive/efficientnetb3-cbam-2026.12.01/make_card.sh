#!/bin/bash
# Regenerates MODEL_CARD.md and LICENSE-DATA.md of models/archive/efficientnetb3-cbam-2026.12.01 from its manifest, eval_test/, eval_fullres/ and the run.
set -euo pipefail
cd "$(dirname "$0")/../../.."
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m ml.model_card --artifact models/archive/efficientnetb3-cbam-2026.12.01 --run runs/ham10000-b3cbam-120x160 \
  --command "# the network: 28 epochs from random initialisation (focal loss, class weights), best epoch 23 by validation" \
  --command "python -m ml.train --data ../shared/data/ham10000-200x150 --out runs/ham10000-b3cbam-120x160 --weights none --img-size 120 160 --batch-size 32 --epochs 28 --loss focal --gamma 2.0 --balance class_weight --class-weight-power 0.5 --optimizer adamw --lr 1e-3 --monitor balanced_accuracy --patience 20 --lr-patience 3 --seed 42" \
  --command "# this version: the same weights, calibrated again and given the logit-adjusted decision (tau chosen on validation)" \
  --command "python -m ml.train --out runs/ham10000-b3cbam-120x160 --snapshot /tmp/ship --model-version 2026.12.01 --data ../shared/data/ham10000-200x150" \
  --command "python -m ml.export --run /tmp/ship --out models/archive/efficientnetb3-cbam-2026.12.01 --float16 --check" \
  --command "python -m ml.evaluate --model models/archive/efficientnetb3-cbam-2026.12.01 --data ../shared/data/ham10000-200x150 --out models/archive/efficientnetb3-cbam-2026.12.01/eval_test --split test" \
  --command "python -m ml.evaluate --model models/archive/efficientnetb3-cbam-2026.12.01 --data ../shared/data/ham10000-fullres --agreement-with ../shared/data/ham10000-200x150 --out models/archive/efficientnetb3-cbam-2026.12.01/eval_fullres" \
  --command "python -m ml.fusion --model models/archive/efficientnetb3-cbam-2026.12.01 --data ../shared/data/ham10000-200x150 --write" \
  --command "python -m ml.fusion --model models/archive/efficientnetb3-cbam-2026.12.01 --data ../shared/data/ham10000-200x150 --test" \
  --command "bash models/archive/efficientnetb3-cbam-2026.12.01/make_card.sh   # this card"
