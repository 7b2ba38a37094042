#!/usr/bin/env bash
# Every CUDA check in one run, for a machine with an NVIDIA GPU and a CUDA build of PyTorch:
# the CUDA tests, the benchmark in float32 and bfloat16, and the change bfloat16 and float16 make to
# logits and Dice.
# Run from the repository root; results are printed and written under $OUT (default ./gpu_check).
#
#   bash Testing/gpu_check.sh
#
# Wheels placed in .whl/ (for example SimpleITK, where the machine lacks it and cannot reach a
# package index) are installed into a temporary folder first.
set -uo pipefail
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sammed3d_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/sammed3d_site"
fi
python3 -c "import SimpleITK, numpy" 2>/dev/null || {
    echo "SimpleITK or NumPy is missing: put their wheels (for this machine's Python) in .whl/ and carry .whl"
    exit 1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'PyTorch sees no CUDA GPU'; print('torch', torch.__version__)" \
    | tee -a "$out/gpu.txt" || exit 1
# Each check runs whatever the others did; the exit status says whether any failed.
status=0
python3 -m pytest Testing -q -p no:cacheprovider -k cuda -rs 2>&1 | tee "$out/cuda_tests.txt"
status=$((status | PIPESTATUS[0]))
for precision in float32 bfloat16; do
    python3 Testing/benchmark.py --device cuda --runs 10 --precision "$precision" 2>&1 | tee "$out/benchmark_$precision.txt"
    status=$((status | PIPESTATUS[0]))
done
for precision in bfloat16 float16; do
    python3 Testing/precision_check.py --device cuda --precision "$precision" --seeds 0-9 \
        --out "$out/precision_$precision.json" 2>&1 | tee "$out/precision_$precision.txt"
    status=$((status | PIPESTATUS[0]))
done
# Eight files: as many as the device tool brings back from $OUT.
exit "$status"
