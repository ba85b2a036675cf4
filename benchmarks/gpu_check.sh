#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with one CUDA GPU and this repository set up (`make setup`):
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu-check/
#
# 1. the gpu test lane (`make test-gpu`): one training step per precision and deformable kernel on CUDA, and
#    the compiled model (TorchInductor) against eager mode, forward and backward; train.precision fp16 with its
#    GradScaler (tests/training/test_fp16_scaler.py: the epoch loop, skipped steps, scaler resumed from a
#    checkpoint; tests/training/test_train_features_ray.py: the train stage on Ray with a restart);
# 2. benchmarks/model_step.py for swin_v1_t at 1024x1024, batch 2, forward and training step: fp32 and bf16
#    autocast, channels_last, then bf16 + torch.compile; both deformable kernels side by side in each run;
# 3. benchmarks/train_scaling.py --gpu: Ray Train samples/s with 1 and 2 workers. Only with 2 or more GPUs:
#    Ray waits for a second GPU that will never come rather than failing, so with one GPU the step is left
#    out (and said so).
#
# Every step writes its table (and JSON where the script has it) under OUT_DIR; a failing step is recorded
# and the others still run; the exit status is non-zero if any step failed. Every step has a time limit.
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
run tests timeout 1200 "$py" -m pytest -q -p no:cacheprovider -m gpu tests
step=(benchmarks/model_step.py --device cuda --encoder swin_v1_t --sizes 1024 --batch 2 --modes eval,train
      --repeats 10 --warmup 3 --impls torchvision,sampling)
run model_fp32 timeout 1200 "$py" "${step[@]}" --dtype fp32 --json "$out/model_fp32.json"
run model_bf16 timeout 1200 "$py" "${step[@]}" --dtype bf16 --json "$out/model_bf16.json"
run model_bf16_cl timeout 1200 "$py" "${step[@]}" --dtype bf16 --channels-last --json "$out/model_bf16_cl.json"
run model_bf16_cl_compile timeout 1200 "$py" "${step[@]}" --dtype bf16 --channels-last --compile \
  --json "$out/model_bf16_cl_compile.json"
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if ((gpus >= 2)); then
  run train_scaling timeout 1800 "$py" benchmarks/train_scaling.py --gpu --size 512 --encoder swin_v1_t --batch 4
else
  echo "== train_scaling: left out ($gpus GPU(s); 2 Ray workers need 2)" | tee "$out/train_scaling.txt"
fi

if ((${#failed[@]})); then
  echo "gpu_check: failed steps: ${failed[*]} (outputs in $out/)"
  exit 1
fi
echo "gpu_check: all steps passed (outputs in $out/)"
