#!/usr/bin/env bash
# CUDA paths in one prepared run: bash bench/gpu_check.sh [OUT_DIR]
#
# 1. a SmolLM2-135M-shaped teacher with random weights (bench/make_random_teacher.py; the real
#    weights are too large to send to a lent GPU machine),
# 2. the speed benchmark on the GPU (bf16 autocast vs plain fp32 / bf16 loops, warm teacher cache),
# 3. distill in bf16 and in fp16 (loss scaling), and with hidden-state + attention + embedding losses
#    and the teacher cache,
# 4. finetune: LoRA in bf16 and QLoRA (bitsandbytes NF4 on CUDA).
# SMALL=1 shrinks every size for a quick rehearsal on a CPU. Exit status 1 if any step failed.
set -u
OUT=${1:-${OUT:-/tmp/entrenar-gpu}}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ENTRENAR_CACHE=${ENTRENAR_CACHE:-/tmp/entrenar-cache}
if command -v nvidia-smi >/dev/null && [ -d .whl ]; then
  # the lent machine has torch but not every package of ours: wheels travel in .whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=${PYTHON:-python3}
E="$PY -m entrenar_cli"
# SMALL: CPU rehearsal sizes, and fp32 where the GPU run asks for bf16/fp16 (CPUs emulate them slowly)
if [ -n "${SMALL:-}" ]; then B=2; S=64; N=3; BLOCKS=40; BF16=fp32; FP16=fp32
else B=16; S=512; N=10; BLOCKS=1200; BF16=bf16; FP16=fp16; fi
status=0
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  "$@" > "$OUT/step.log" 2>&1
  local rc=$?
  cat "$OUT/step.log" >> "$LOG"
  echo "--- $name rc=$rc ($((SECONDS - t0)) s)"
  tail -n "${TAIL:-12}" "$OUT/step.log"
  [ $rc = 0 ] || status=1
}
nvidia-smi -L 2>/dev/null | tee -a "$LOG"
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee -a "$LOG"

step teacher $PY bench/make_random_teacher.py .gpu/smol /tmp/smol
[ -n "${SKIP_BENCH:-}" ] || TAIL=14 step bench $PY -m bench.distill_speed --teacher /tmp/smol --batch $B --seq $S --steps $N --blocks $BLOCKS

cat > /tmp/gpu-distill.yaml <<YAML
teacher:
  model_id: /tmp/smol
student:
  init_from_teacher: {layers: 6}
training: {max_steps: $((N * 2)), batch_size: $B, learning_rate: 5e-4, eval_steps: $N, eval_batches: 2, logging_steps: 5}
dataset: {path: "{stdlib}/**/*.py", max_length: $S, max_blocks: $BLOCKS, eval_fraction: 0.05}
output: {dir: /tmp/gpu-runs/bf16}
YAML
step distill-bf16 $E distill /tmp/gpu-distill.yaml --overwrite --set training.mixed_precision=$BF16
step distill-fp16 $E distill /tmp/gpu-distill.yaml --overwrite --set training.mixed_precision=$FP16 --set output.dir=/tmp/gpu-runs/fp16
step distill-all-losses $E distill /tmp/gpu-distill.yaml --overwrite --set output.dir=/tmp/gpu-runs/all \
  --set distillation.alpha=0.5 --set distillation.progressive.enabled=true --set 'distillation.progressive.layer_mapping=[[5,29]]' \
  --set distillation.attention.enabled=true --set distillation.embedding.enabled=true \
  --set distillation.teacher_cache.enabled=true --set training.epochs=2 --set training.max_steps=null \
  --set dataset.max_blocks=$((B * N))

cat > /tmp/gpu-finetune.yaml <<YAML
model: {model_id: /tmp/gpu-runs/bf16}
method: lora
lora: {rank: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
training: {max_steps: $N, batch_size: $B, learning_rate: 2e-4, eval_steps: $N, eval_batches: 2, logging_steps: 5}
dataset: {path: "{stdlib}/asyncio/*.py", max_length: $S}
output: {dir: /tmp/gpu-runs/lora}
YAML
step finetune-lora $E finetune /tmp/gpu-finetune.yaml --overwrite
step finetune-qlora $E finetune /tmp/gpu-finetune.yaml --overwrite --set method=qlora --set output.dir=/tmp/gpu-runs/qlora
rm -f "$OUT/step.log"
echo "gpu_check: status $status" | tee -a "$LOG"
exit $status
