#!/usr/bin/env bash
# Retrain the demo's bundled model (anogan_batch/data/model/) with the project's own commands.
# Run from the repository root with the venv active. CPU, about 6 minutes on 2 cores
# (GAN with an EMA of G, then the encoder: train's defaults, docs/quality.md), except
# --input-norm none and --input-blur 0.0 (pixels as stored: on the demo, contrast normalisation
# costs AUROC and the blur costs the scan decisions; docs/quality.md, "The demo's model"), and
# --feature-layer -1, the layer the bundled model was trained and measured with.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m anogan_batch.evaluation.demo "$work/scans" train          # the 4,000 training zeros as PNGs
anogan-batch ingest "$work/scans" "$work/patches" --patch-size 28 --label-from-parent
rm -rf anogan_batch/data/model
anogan-batch train "$work/patches" anogan_batch/data/model \
  --normal-label 0 --input-norm none --input-blur 0.0 --feature-layer -1 \
  --calibration-fraction 0.0 --no-progress
# float16 weights: half the bytes in the package (a test bounds the score change)
python -c "from anogan_batch.core.modeldir import compact_model; compact_model('anogan_batch/data/model')"
# Calibration on 500 held-out zeros that the model never saw and no demo scan holds (the
# sample's calibration split): train's own held-out share would come from the 4,000 above.
python -m anogan_batch.evaluation.demo "$work/calibration_scans" calibration
anogan-batch ingest "$work/calibration_scans" "$work/calibration_patches" --patch-size 28 \
  --label-from-parent
anogan-batch calibrate anogan_batch/data/model "$work/calibration_patches" --normal-label 0
