#!/usr/bin/env bash
# The GPU machine's check of the service (once the machine is prepared: `source .device/remote-setup.sh`),
# from the project root: the inference process's fault tests with the process on CUDA, then gpu_serve.py's
# modes side by side. Everything lands in $OUT (default gpu-results): the test report and gpu_serve's files.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
DIGITGEN_TEST_PROVIDERS=cuda timeout 300 python -m pytest -p no:cacheprovider -q -rA tests/test_inference_process.py \
    > "$out/test_inference_process.txt" 2>&1
echo "test_inference_process on CUDA: exit $?" | tee -a "$out/gpu.txt"
timeout 270 python tests/benchmarks/gpu_serve.py --out "$out" --seconds 8
echo "gpu_serve: exit $?" | tee -a "$out/gpu.txt"
