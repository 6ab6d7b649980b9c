#!/usr/bin/env bash
# The GPU figures of bench/README.md in one script, for a session that has a GPU for a few ten-minute calls:
# random-weight models of SmolLM2-135M's shape (and, with SIZES="135m 1b", a ~1.1B Llama shape), then
#   generation  bench/generation.py     hf vs static vs static+compile at batch 1, 64 and 256, 128 new tokens
#   ppo         bench/ppo_iteration.py  one PPO iteration vs one TRL GRPO step, 64 prompts x 4, 128 new tokens:
#               engine hf; static reusing the sampler's log-probs; the same with the decode step compiled
#   train       bench/train_throughput.py  DPO, RM and SFT vs TRL, batch 8, 256 + 256 tokens, fixed and real text;
#               then DPO again with our padding_free packing
# Each bench writes OUT/<bench>_<size>[_<variant>].txt (its table) and .json; progress.txt timestamps every start/end.
#
#   bash scripts/gpu_bench.sh [SOURCE]        # SOURCE: folder with SmolLM2's config.json + tokenizer
# Environment: OUT (default /tmp/gpu_bench), BENCHES (default "generation ppo train"), SIZES (default "135m"),
# DEVICE (cuda), PRECISION (bf16), TIMEOUT (seconds per bench command, 400), and for a CPU trial of the plumbing
# SMALL=1 (tiny shapes and few steps):
#   SMALL=1 DEVICE=cpu PRECISION=fp32 bash scripts/gpu_bench.sh models/smollm2-135m-instruct
set -uo pipefail
SOURCE=${1:-models/smollm2-135m-instruct}
OUT=${OUT:-/tmp/gpu_bench}
BENCHES=${BENCHES:-generation ppo train}
SIZES=${SIZES:-135m}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
TIMEOUT=${TIMEOUT:-400}
SMALL=${SMALL:-0}
PY=${PYTHON:-$(command -v python || command -v python3)}  # machines with only python3 (no `python`) work too
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LIGHTNING_RLHF_CACHE=${LIGHTNING_RLHF_CACHE:-$OUT/cache}
say() { echo "$(date +%T) $*" | tee -a "$OUT/progress.txt"; }
bench() {  # name, then the command; the table goes to OUT/name.txt
  local name=$1; shift
  say "start $name"
  timeout "$TIMEOUT" "$PY" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  say "end $name rc=$rc"
  grep -v -e "it/s]" -e "^Loading" "$OUT/$name.txt" | tail -n 40
}

if [ "$SMALL" = 1 ]; then
  GEN_ARGS=(--batch-sizes 1 4 --prompt-len 16 --new-tokens 8 --repeats 2)
  PPO_ARGS=(--prompts 2 --completions 2 --new-tokens 8 --prompt-len 16 --warmup 1 --iters 1)
  TRAIN_ARGS=(--batch-size 2 --prompt-len 16 --completion-len 16 --max-length 128 --warmup 1 --steps 2)
  SET_135M=(hidden_size=64 intermediate_size=128 num_hidden_layers=2 num_attention_heads=4 num_key_value_heads=2 head_dim=16)
  SET_1B=(hidden_size=128 intermediate_size=256 num_hidden_layers=2 num_attention_heads=4 num_key_value_heads=2 head_dim=32)
else
  GEN_ARGS=(--batch-sizes 1 64 256 --prompt-len 128 --new-tokens 128 --repeats 3)
  PPO_ARGS=(--prompts 64 --completions 4 --new-tokens 128 --prompt-len 64 --warmup 2 --iters 5)
  TRAIN_ARGS=(--batch-size 8 --prompt-len 256 --completion-len 256 --max-length 1024 --warmup 5 --steps 20)
  SET_135M=()
  SET_1B=(hidden_size=2048 intermediate_size=5632 num_hidden_layers=22 num_attention_heads=32 num_key_value_heads=4 head_dim=64)
fi

say "preflight"
"$PY" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" | tee -a "$OUT/progress.txt"
for size in $SIZES; do
  model=$OUT/model-$size
  if [ ! -f "$model/config.json" ]; then
    if [ "$size" = 1b ]; then set=("${SET_1B[@]}"); else set=("${SET_135M[@]}"); fi
    extra=(); [ ${#set[@]} -gt 0 ] && extra=(--set "${set[@]}")
    "$PY" scripts/random_model.py --source "$SOURCE" --out "$model" "${extra[@]}" >>"$OUT/progress.txt" 2>&1 \
      || { say "could not build model-$size"; exit 1; }
  fi
  common=(--model "$model" --device "$DEVICE" --precision "$PRECISION")
  for b in $BENCHES; do
    case $b in
      generation)
        bench "generation_$size" bench/generation.py "${common[@]}" "${GEN_ARGS[@]}" --engines hf static static+compile ;;
      ppo)
        bench "ppo_${size}_hf" bench/ppo_iteration.py "${common[@]}" "${PPO_ARGS[@]}" --json "$OUT/ppo_${size}_hf.json"
        bench "ppo_${size}_static" bench/ppo_iteration.py "${common[@]}" "${PPO_ARGS[@]}" --engine static \
          --ppo-set reuse_rollout_logprobs=true --json "$OUT/ppo_${size}_static.json"
        bench "ppo_${size}_compiled" bench/ppo_iteration.py "${common[@]}" "${PPO_ARGS[@]}" --engine static \
          --ppo-set reuse_rollout_logprobs=true rollout_compile=true --json "$OUT/ppo_${size}_compiled.json" ;;
      train)
        bench "train_$size" bench/train_throughput.py "${common[@]}" "${TRAIN_ARGS[@]}" --json "$OUT/train_$size.json"
        bench "train_${size}_padfree" bench/train_throughput.py "${common[@]}" "${TRAIN_ARGS[@]}" --methods dpo \
          --padding-free --json "$OUT/train_${size}_padfree.json" ;;
      *) say "unknown bench $b (generation, ppo, train)" ;;
    esac
  done
done
say "done"
