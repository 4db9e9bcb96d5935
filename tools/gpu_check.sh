#!/bin/bash
# The GPU checks and timings of README "GPUs", on one CUDA GPU:
#   bash tools/gpu_check.sh NANOGPT_DIR TEXT [OUT_DIR]
# NANOGPT_DIR: a checkout of karpathy/nanoGPT whose data/shakespeare_char/prepare.py has run;
# TEXT: tiny shakespeare's input.txt. Logs and metrics go to OUT_DIR (default gpu_check/).
# A: the fused (compiled) step of each optimizer against its eager step, the trainers' CUDA
#    paths (bf16 autocast + compile, fp16 + GradScaler, the ViT), all at once: none is timed,
#    and they fill the compile caches of what follows.
# B: ms/iter of nanoGPT's train.py against nanogpt_sai.py at the gpu preset, one at a time.
# C: bench.py on the GPU, the default paths and the references; --results keeps the finished
#    rows, so PHASES=C and the same OUT_DIR finish an interrupted table.
# PHASES (default ABC) picks the phases; PYTHON (default python3) the interpreter.
set -u
[ $# -ge 2 ] || { sed -n 3,5p "$0"; exit 2; }
NANOGPT=$(realpath "$1"); TEXT=$(realpath "$2"); OUT=$(realpath -m "${3:-gpu_check}")
mkdir -p "$OUT/a"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PHASES=${PHASES:-ABC}
python() { "${PYTHON:-python3}" "$@"; }
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
D="--data_path=$TEXT --sample_tokens=0 --eval_sample_tokens=0 --eval_iters=2"

if [[ $PHASES == *A* ]]; then
say "A: CUDA paths, in parallel"
for name in adamw sgd_sai adam_mini apollo apollo_mini adafactor; do
  python tools/fused_vs_eager.py $name 12x768 cuda > "$OUT/a/fused_$name.txt" 2>&1 &
done
(cd "$NANOGPT" && python train.py config/train_shakespeare_char.py --max_iters=20 \
  --eval_iters=2 --out_dir="$OUT/a/nanogpt") > "$OUT/a/nanogpt_warm.txt" 2>&1 &
for o in adamw sgd_sai; do
  python nanogpt_sai.py --optimizer=$o --compile=True --max_iters=20 $D \
    --out_dir="$OUT/a/warm_$o" > "$OUT/a/warm_$o.txt" 2>&1 &
done
python nanogpt_sai.py --dtype=float16 --max_iters=60 --log_interval=20 $D \
  --out_dir="$OUT/a/fp16" > "$OUT/a/fp16.txt" 2>&1 &
python vit_sai.py --dataset=digits --compile=True --max_iters=100 --out_dir="$OUT/a/vit" \
  > "$OUT/a/vit.txt" 2>&1 &
wait
cat "$OUT"/a/fused_*.txt
grep -il "warning\|error" "$OUT"/a/*.txt
for f in fp16 vit warm_adamw warm_sgd_sai; do grep -H "^result" "$OUT/a/$f.txt"; done
fi

if [[ $PHASES == *B* ]]; then

say "B: ms/iter at the gpu preset (6x384, block 256, batch 64, bf16, compiled), 600 steps"
(cd "$NANOGPT" && python train.py config/train_shakespeare_char.py --max_iters=600 \
  --eval_interval=10000 --eval_iters=2 --log_interval=100 --out_dir="$OUT/nanogpt") 2>&1 \
  | while IFS= read -r line; do echo "$(date +%s.%N) $line"; done > "$OUT/nanogpt.txt"
for o in adamw sgd_sai; do
  python nanogpt_sai.py --optimizer=$o --compile=True --max_iters=600 --eval_interval=600 \
    --log_interval=100 $D --out_dir="$OUT/ours_$o" > "$OUT/ours_$o.txt" 2>&1
done
python tools/ms_per_iter.py "nanoGPT train.py (fused AdamW)" "$OUT/nanogpt.txt" \
  "nanogpt_sai.py --optimizer=adamw" "$OUT/ours_adamw/metrics.jsonl" \
  "nanogpt_sai.py (SGD-SaI)" "$OUT/ours_sgd_sai/metrics.jsonl"
fi

if [[ $PHASES == *C* ]]; then

say "C: bench.py on the GPU"
rows=torch_adamw_fused,torch_adamw_foreach,torch_sgd_fused,adamw_fused,sgd_sai_fused
rows+=,adam_mini_fused,apollo_fused,apollo_mini_fused,adafactor_fused,muon,torch_muon
rows+=,torch_adafactor,official_sgd_sai,official_adam_mini
python -c "import sgd_sai, adam_mini" 2>/dev/null || rows=${rows%,official_sgd_sai*}
python bench.py --device=cuda --threads=0 --sizes=12x768 --rounds=2 --steps=60 --rows=$rows \
  --results="$OUT/bench.jsonl" 2>&1 | grep -v " round " | tee "$OUT/bench.txt"
fi
say "done"
