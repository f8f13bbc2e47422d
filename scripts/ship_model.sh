#!/bin/bash
# Ships the best validated weights of a training run as the new default model version:
#
#   bash scripts/ship_model.sh RUN VERSION [FIRST_STEP]
#   bash scripts/ship_model.sh runs/ham10000-b3cbam-v5-mild 2026.12.01.2
#
# Steps, in order (FIRST_STEP restarts a failed ship from that step):
#   snapshot  the run's best weights, calibrated, decision fitted on validation (no test yet)
#   archive   models/default moves to models/archive/<name>-<version>; it stays registered
#   export    float16 weights into models/default, checked against the snapshot
#   test      the test split, looked at once for this version, and the full-resolution agreement
#   heads     the metadata head, the retrieval projection and the not-dermoscopy detector, refitted
#             on the new network (each reads its outputs) and stored in the artifact
#   card      make_card.sh written for this version, then run
#   fixtures  the browser tests' explanation maps (tests/fixtures/maps) remade from the new model
# Everything that chooses (epoch, temperature, tau, thresholds, head settings) uses validation only.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${1:?usage: ship_model.sh RUN VERSION [FIRST_STEP]}
VERSION=${2:?usage: ship_model.sh RUN VERSION [FIRST_STEP]}
FIRST_STEP=${3:-snapshot}
DATA=${DATA:-../shared/data/ham10000-200x150}
FULLRES=${FULLRES:-../shared/data/ham10000-fullres}
PY=${PY:-.venv/bin/python}
STAGE=${STAGE:-/tmp/ship-$VERSION}
export TF_CPP_MIN_LOG_LEVEL=2
STEPS=(snapshot archive export test heads card fixtures)

manifest_field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1/manifest.json" "$2"; }

snapshot() {
  "$PY" -m ml.train --out "$RUN" --snapshot "$STAGE" --model-version "$VERSION" --no-test-eval --data "$DATA"
}

archive() {
  local old
  old="models/archive/$(manifest_field models/default name)-$(manifest_field models/default version)"
  [ -e "$old" ] && { echo "$old exists already" >&2; exit 1; }
  git mv models/default "$old"
  basename "$old" >"$STAGE/previous_version"
  # the archived card's commands name the folder it now lives in, one level deeper
  sed -i -e "s#models/default#$old#g" -e 's#/\.\./\.\."#/../../.."#' "$old/make_card.sh"
  bash "$old/make_card.sh"
}

export_weights() {
  "$PY" -m ml.export --run "$STAGE" --out models/default --float16 --check
}

test_once() {
  "$PY" -m ml.evaluate --model models/default --data "$DATA" --out models/default/eval_test --split test
  "$PY" -m ml.evaluate --model models/default --data "$FULLRES" --agreement-with "$DATA" --out models/default/eval_fullres
}

heads() {
  "$PY" -m ml.fusion --model models/default --data "$DATA" --write
  "$PY" -m ml.fusion --model models/default --data "$DATA" --test
  "$PY" -m ml.retrieval --model models/default --data "$DATA" --cache "$STAGE/split_embeddings.npz" --write
  # the detector's variant chosen leaving each kind of outlier out, then fitted and stored
  "$PY" -m ml.ood_choice --model models/default --data "$DATA" --cache "$STAGE/split_embeddings.npz" \
    --outlier-cache "$STAGE/outlier_embeddings.npz" --stats-cache "$STAGE/image_stats.npz" --write
}

card() {
  local previous
  previous=$(cat "$STAGE/previous_version")
  cat >models/default/make_card.sh <<EOF
#!/bin/bash
# Regenerates MODEL_CARD.md and LICENSE-DATA.md of models/default from its manifest, eval_test/, eval_fullres/ and the runs.
set -euo pipefail
cd "\$(dirname "\$0")/../.."
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m ml.model_card --artifact models/default --run $RUN \\
  --compare "runs/ham10000-b3cbam-120x160=from scratch; focal loss with class weights; flips, rotation, zoom, shift, brightness, contrast; AdamW 1e-3, halved on plateaus" \\
  --compare "runs/ham10000-b3cbam-v3=warm start; logit-adjusted cross-entropy with label smoothing 0.1; strong augmentation (random resized crops, 90-degree turns, colour jitter, mixup); AdamW, cosine from 3e-4" \\
  --compare "runs/ham10000-b3cbam-v4=as v3, cosine from 1e-4" \\
  --compare "runs/ham10000-b3cbam-v5-mild=warm start; focal loss with class weights (as the first run); mild augmentation (crops of 80-100 % of the area, flips, brightness and contrast +-10 %, no mixup); AdamW, cosine from 1e-4" \\
  --command "# the network: the run below (arguments above), warm-started from the weights of $previous" \\
  --command "python -m ml.train --out $RUN --resume --no-test-eval --data $DATA   # once per session, from the committed carry-over" \\
  --command "# this version (bash scripts/ship_model.sh $RUN $VERSION runs these): the run's best epoch by validation," \\
  --command "# calibrated and decided on validation, the test split evaluated once, the heads refitted on the new network" \\
  --command "python -m ml.train --out $RUN --snapshot $STAGE --model-version $VERSION --no-test-eval --data $DATA" \\
  --command "python -m ml.export --run $STAGE --out models/default --float16 --check" \\
  --command "python -m ml.evaluate --model models/default --data $DATA --out models/default/eval_test --split test" \\
  --command "python -m ml.evaluate --model models/default --data $FULLRES --agreement-with $DATA --out models/default/eval_fullres" \\
  --command "python -m ml.fusion --model models/default --data $DATA --write" \\
  --command "python -m ml.fusion --model models/default --data $DATA --test" \\
  --command "python -m ml.retrieval --model models/default --data $DATA --write" \\
  --command "python -m ml.ood_choice --model models/default --data $DATA --write" \\
  --command "bash models/default/make_card.sh   # this card"
EOF
  bash models/default/make_card.sh
}

started=false
for step in "${STEPS[@]}"; do
  [ "$step" = "$FIRST_STEP" ] && started=true
  $started || continue
  echo "== $step ($(date +%H:%M:%S))"
  case $step in
    snapshot) snapshot ;;
    archive) archive ;;
    export) export_weights ;;
    test) test_once ;;
    heads) heads ;;
    card) card ;;
    fixtures) "$PY" tests/fixtures/maps/make_maps.py ;;
  esac
done
$started || { echo "unknown step $FIRST_STEP (one of ${STEPS[*]})" >&2; exit 2; }
echo "Shipped $VERSION into models/default. Commit models/ and tests/fixtures/maps, and update docs/model.md's figures."
