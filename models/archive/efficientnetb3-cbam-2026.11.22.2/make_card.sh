#!/bin/bash
# Regenerates MODEL_CARD.md and LICENSE-DATA.md of models/archive/efficientnetb3-cbam-2026.11.22.2 from its manifest, eval_test/ and the run.
set -euo pipefail
cd "$(dirname "$0")/../../.."
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m ml.model_card --artifact models/archive/efficientnetb3-cbam-2026.11.22.2 --run runs/ham10000-b3cbam-120x160 \
  --command "# session 1 (2026-11-21): epochs 1-8, then carried over as runs/ham10000-b3cbam-120x160/resume/ (float16)" \
  --command "python -m ml.train --data ../shared/data/ham10000-200x150 --out runs/ham10000-b3cbam-120x160 --weights none --img-size 120 160 --batch-size 32 --epochs 40 --loss focal --gamma 2.0 --balance class_weight --class-weight-power 0.5 --optimizer adamw --lr 1e-3 --monitor balanced_accuracy --patience 8 --lr-patience 3 --seed 42" \
  --command "# session 2 (2026-11-22): epochs 9-19 (patience raised so that early stopping cannot end a from-scratch run at epoch 14); shipped as 2026.11.22" \
  --command "python -m ml.train --out runs/ham10000-b3cbam-120x160 --resume --patience 20 --data ../shared/data/ham10000-200x150" \
  --command "# session 3 (2026-11-22): epochs 20-28 from the committed carry-over, then stopped (end of the session's time)" \
  --command "python -m ml.train --out runs/ham10000-b3cbam-120x160 --resume --epochs 40 --patience 20 --data ../shared/data/ham10000-200x150" \
  --command "# finalise at the last epoch run: best epoch's weights, temperature, thresholds; released as 2026.11.22.2" \
  --command "python -m ml.train --out runs/ham10000-b3cbam-120x160 --resume --epochs 28 --model-version 2026.11.22.2 --data ../shared/data/ham10000-200x150" \
  --command "python -m ml.export --run runs/ham10000-b3cbam-120x160 --out models/archive/efficientnetb3-cbam-2026.11.22.2 --float16 --check" \
  --command "python -m ml.evaluate --model models/archive/efficientnetb3-cbam-2026.11.22.2 --data ../shared/data/ham10000-200x150 --out models/archive/efficientnetb3-cbam-2026.11.22.2/eval_test --split test" \
  --command "bash models/archive/efficientnetb3-cbam-2026.11.22.2/make_card.sh   # this card"
