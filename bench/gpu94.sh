#!/usr/bin/env bash
# The whole GPU benchmark, unattended (a few minutes on one recent GPU): verify and prepare CIFAR-10, then
# bench/train.py on configs/gpu94.yaml — one untimed warm-up run, five seeds, time to 94% — into one JSON file.
#
#   bash bench/gpu94.sh                                  # with the project's environment (uv sync)
#   PYTHON=python3 bash bench/gpu94.sh                   # any Python that imports cifarlab's dependencies
#   OUT=bench/results/gpu94-h100.json bash bench/gpu94.sh
#   SEEDS=2 WARMUP=0 bash bench/gpu94.sh                 # a shorter check: two seeds, no warm-up run
#
# CIFARLAB_ARCHIVE names the archive if data/cifar10 is not prepared yet (see README). Extra arguments go to
# bench/train.py: the test suite runs this script on the CPU with a tiny network on a subset of the data.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-"uv run --locked python"}
CONFIG=${CONFIG:-configs/gpu94.yaml}
SEEDS=${SEEDS:-5}
OUT=${OUT:-bench/results/gpu94.json}
DATA=${DATA:-data/cifar10}

# fail at once, naming what is missing, rather than after minutes of set-up
$PYTHON -c "import importlib.util as u, sys
missing = [m for m in ('torch', 'lightning', 'jsonargparse', 'psutil', 'cifarlab') if u.find_spec(m) is None]
sys.exit(f'bench/gpu94.sh: this Python cannot import {\", \".join(missing)}; run uv sync, or set PYTHON' if missing else 0)"
# every run's data module verifies the prepared data (and prepares it from CIFARLAB_ARCHIVE when missing)
# WARMUP=0 leaves out the untimed warm-up run (kernels and caches are then part of the first timed run)
$PYTHON bench/train.py "$CONFIG" --seeds "$SEEDS" $([ "${WARMUP:-1}" = 0 ] || echo --warmup) --target 0.94 \
  --set=--data.data_dir="$DATA" --out "$OUT" "$@"
