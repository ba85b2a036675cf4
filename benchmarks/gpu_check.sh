#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with one CUDA GPU and this repository set up (`make setup`):
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu-check/
#
# 1. the gpu test lane (`make test-gpu`): one training step per precision and deformable kernel on CUDA, and
#    the compiled model (TorchInductor) against eager mode, forward and backward;
# 2. benchmarks/model_step.py for swin_v1_t at 1024x1024, batch 2, forward and training step: fp32 and bf16
#    autocast, channels_last, then bf16 + torch.compile; both deformable kernels side by side in each run;
# 3. benchmarks/train_scaling.py --gpu: Ray Train samples/s with 1 and 2 workers (2 workers need 2 GPUs;
#    with one GPU that row reports the error and the script goes on).
#
# Every step writes its table (and JSON where the script has it) under OUT_DIR; a failing step is recorded
# and the others still run; the exit status is non-zero if any step failed. About 10 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
failed=()

run() {  # run NAME CMD...: tee the output to OUT/NAME.txt, remember failures
  local name=$1
  shift
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$out/$name.txt"; then
    failed+=("$name")
  fi
}

run environment "$py" -c "import torch, torchvision; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0), \
'bf16' if torch.cuda.is_bf16_supported() else 'no bf16')"
run tests "$py" -m pytest -q -p no:cacheprovider -m gpu tests
step=(benchmarks/model_step.py --device cuda --encoder swin_v1_t --sizes 1024 --batch 2 --modes eval,train
      --repeats 10 --warmup 3 --impls torchvision,sampling)
run model_fp32 "$py" "${step[@]}" --dtype fp32 --json "$out/model_fp32.json"
run model_bf16 "$py" "${step[@]}" --dtype bf16 --json "$out/model_bf16.json"
run model_bf16_cl "$py" "${step[@]}" --dtype bf16 --channels-last --json "$out/model_bf16_cl.json"
run model_bf16_cl_compile "$py" "${step[@]}" --dtype bf16 --channels-last --compile \
  --json "$out/model_bf16_cl_compile.json"
run train_scaling "$py" benchmarks/train_scaling.py --gpu --size 512 --encoder swin_v1_t --batch 4

if ((${#failed[@]})); then
  echo "gpu_check: failed steps: ${failed[*]} (outputs in $out/)"
  exit 1
fi
echo "gpu_check: all steps passed (outputs in $out/)"
