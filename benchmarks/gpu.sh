#!/usr/bin/env bash
# The GPU check, in one go, on a lent GPU machine (the device tool runs it in a copy of the
# working tree): normlab's s6 suite at one seed against the seed's pipeline on the same GPU.
# Needs a Python with a CUDA build of torch (the machine's), and MNIST cached beforehand in
# .data (NORMLAB_DATA=.data normlab data fetch on this machine; carry .data along), since
# the GPU machine reaches no network.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m venv --system-site-packages /tmp/nlv
/tmp/nlv/bin/pip install -q --no-deps -e . 2>/dev/null
/tmp/nlv/bin/pip install -q torchinfo tqdm matplotlib openpyxl scipy pillow 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv
NORMLAB_DATA=.data NORMLAB_OFFLINE=1 /tmp/nlv/bin/python benchmarks/bench_gpu.py "$@"
