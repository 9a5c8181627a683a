#!/usr/bin/env bash
# The GPU check of bench/train.py: bf16 samples/s and MFU on one GPU. Runs with the
# machine's own python3 (which holds torch); nothing here needs Ray or DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=. python3 -m bench.train_gpu "$@"
