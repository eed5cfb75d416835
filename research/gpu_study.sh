#!/usr/bin/env bash
# The study as run on a lent GPU machine (no network there; the machine's own torch/timm/opencv).
# Data travels packed in .gpu/: Original/ JPEGs and the cleaned mask cache from `hybridcn masks`.
# Usage: research/gpu_study.sh DATA_DIR MASKS OUT_DIR MINUTES [extra study flags]
# e.g. the compact profile's ablations over 5 folds with the shipped recipe (a fresh OUT, then `hybridcn report`):
#   research/gpu_study.sh .gpu/data .gpu/masks.npz $OUT 11 --seg-epochs 4 --backbone-epochs 24 --head-epochs 40 \
#       --batch-size 32 --feature-views 1 --paper-fold
# A later --profile paper overrides the compact default.
set -u
data=$1 masks=$2 out=$3 minutes=$4
shift 4
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || true
python3 -c "import torch, timm, numpy; print('torch', torch.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
# hard stop a little after the study's own budget so the results are always packed
timeout $(( ${minutes%.*} * 60 + 75 )) python3 -m hybridcn.cli study --data "$data" --masks "$masks" --out /tmp/study \
  --profile compact --minutes "$minutes" "$@"
echo "study exit $?"
rm -f /tmp/study/final/backbones.ckpt
# the per-fold full models (tens of MB each) stay behind: only results, logs and the final model come back
tar -C /tmp --exclude='study/cv*/models' -cf - study | split -b 15M - "$out/study.tar."
ls -la "$out"
