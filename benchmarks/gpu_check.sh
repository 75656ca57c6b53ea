#!/usr/bin/env bash
# Everything a lent CUDA GPU should check, in one call (about 5-8 minutes on an H100):
# build the native extensions, run the `cuda` tests (the op-offload upload path among them),
# then a hybrid `hyprof run` (experts on the CPU, the rest on CUDA0; pp512 with op offload, its
# experts uploaded over PCIe, and without, -nopo 1, so the report has both sides of the
# crossover) and an all-GPU one, with their reports and plots under $OUT (at most 8 files come
# back from the device tool: 2 reports, the cuda tests' log, 5 plots).
#
# The device machine has python3 with torch, pytest, numpy, rich and matplotlib, but no
# package registry: gguf and orjson travel as wheels. Once, here, in the repo's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     gguf==0.19.0 orjson==3.13.0 tqdm pyyaml requests
# then call the device tool with carry ['.whl'] and command `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/gpu}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

echo "== build"
python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }

echo "== pytest -m cuda"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$OUT/pytest-cuda.log"

THREADS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
echo "== hybrid: experts on the CPU (-t $THREADS), the rest on CUDA0; op offload on and off"
python3 -m hyprof run -p 512 -n 64 -r 3 -t "$THREADS" --accel cuda -ngl 99 -ot '\.ffn_.*_exps\.=CPU' \
    -nopo 0,1 -o "$OUT/hybrid.jsonl" --force --no-progress
python3 -m hyprof report "$OUT/hybrid.jsonl" --md "$OUT/hybrid.md" --plots "$OUT/plots" --force

echo "== all on CUDA0 (MUL_MAT_ID on the device)"
python3 -m hyprof run -p 64 -n 32 -r 3 -t "$THREADS" --accel cuda -ngl 99 -o "$OUT/gpu.jsonl" --force --no-progress
python3 -m hyprof report "$OUT/gpu.jsonl" --md "$OUT/gpu.md" --force > /dev/null
rm -f "$OUT/hybrid.jsonl" "$OUT/gpu.jsonl"        # large; the reports hold the figures
echo "gpu_check: done; results in $OUT"
