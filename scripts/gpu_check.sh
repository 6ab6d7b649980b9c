#!/usr/bin/env bash
# GPU verification of the sharded strategies: DPO and PPO on the SmolLM2-135M architecture (random weights, the real
# tokenizer) in bf16-mixed under fsdp, deepspeed_stage_2 and deepspeed_stage_3, then the `gpu` tests of
# tests/test_gpu_strategies.py (the built-in tiny model). Every run ends with a `run_summary {json}` line
# (callbacks/run_summary.py: steps, median step time, peak GPU memory, first and last metrics); the table at the end
# collects them.
#
#   bash scripts/gpu_check.sh [SOURCE]     # SOURCE: folder or hub id with SmolLM2's config.json + tokenizer
#                                          # (default models/smollm2-135m-instruct; its weights are not read)
# Environment: OUT (logs, default /tmp/gpu_check), STRATEGIES (default "fsdp deepspeed_stage_2 deepspeed_stage_3"),
# METHODS (default "dpo ppo ppo_static"; ppo_static = PPO with the static-cache rollout engine reusing its log-probs,
# compiled decode step, run only under strategies that do not shard parameters: ddp, deepspeed_stage_2), JOBS (runs at once, default 3), STEPS (DPO steps, 8), ITERS (PPO iterations, 3),
# RUN_TIMEOUT (seconds per run, 240), PYTEST (1: also run the gpu tests), EXTRA (more CLI arguments for every run).
# Needs deepspeed for the DeepSpeed runs. The plumbing can be tried on a CPU with a tiny model:
#   STRATEGIES=ddp PYTEST=0 EXTRA="--trainer.accelerator=cpu --trainer.precision=32" \
#     bash scripts/gpu_check.sh ~/.cache/lightning_rlhf/tiny-llama-v1
#
# Runs write no checkpoints (the gpu tests check those) and keep their logs small; every step prints a timestamp, so
# a run that hangs shows where.
set -uo pipefail
SOURCE=${1:-models/smollm2-135m-instruct}
OUT=${OUT:-/tmp/gpu_check}
STRATEGIES=${STRATEGIES:-fsdp deepspeed_stage_2 deepspeed_stage_3}
METHODS=${METHODS:-dpo ppo ppo_static}
JOBS=${JOBS:-3}
STEPS=${STEPS:-8}
ITERS=${ITERS:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
PYTEST=${PYTEST:-1}
PY=${PYTHON:-$(command -v python || command -v python3)}  # machines with only python3 (no `python`) work too
mkdir -p "$OUT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LIGHTNING_RLHF_CACHE=${LIGHTNING_RLHF_CACHE:-$OUT/cache}
say() { echo "$(date +%T) $*" | tee -a "$OUT/progress.txt"; }

say "preflight"
timeout 120 "$PY" - <<'EOF' || { say "preflight failed"; exit 1; }
import importlib, torch, lightning, transformers
print("torch", torch.__version__, "lightning", lightning.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for name in ("deepspeed", "datasets", "jsonargparse"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001 - report and go on: the runs that need it will fail with the reason
        print(name, "NOT IMPORTABLE:", e)
EOF
MODEL=$OUT/smollm2-135m-random
timeout 180 "$PY" scripts/random_model.py --source "$SOURCE" --out "$MODEL" || { say "could not build the model"; exit 1; }
say "model ready"

summary_cb() { echo "{\"class_path\": \"callbacks.run_summary.RunSummary\", \"init_args\": {\"path\": \"$OUT/$1/summary.json\"}}"; }
run() {  # name, port, then CLI arguments
  local name=$1 port=$2; shift 2
  say "start $name"
  MASTER_PORT=$port timeout "$RUN_TIMEOUT" "$PY" cli.py fit "$@" --trainer.logger=false \
    --trainer.enable_progress_bar=false --trainer.enable_checkpointing=false --trainer.default_root_dir="$OUT/$name" \
    --model.init_args.export_dir="$OUT/$name/export" ${EXTRA:-} >"$OUT/$name.log" 2>&1
  say "end $name rc=$?"
}
port=29600
for m in $METHODS; do
  for s in $STRATEGIES; do
    port=$((port + 1))
    if [ "$m" = ppo_static ] && [ "$s" != deepspeed_stage_2 ] && [ "$s" != ddp ]; then
      continue  # refused under FSDP / ZeRO-3 (checked in tests/test_gpu_strategies.py)
    fi
    if [ "$m" = dpo ]; then
      run "dpo_$s" $port -c configs/dpo/smollm2.yaml -c "configs/strategy/$s.yaml" \
        --model.init_args.model_name_or_path="$MODEL" --model.init_args.lr=1e-5 --model.init_args.warmup_steps=0 \
        --trainer.max_steps="$STEPS" --trainer.val_check_interval="$STEPS" --trainer.limit_val_batches=4 \
        --data.init_args.batch_size=8 --data.init_args.max_train_rows=256 --data.init_args.max_val_rows=64 \
        "--trainer.callbacks+=$(summary_cb "dpo_$s")" &
    else
      engine=()
      [ "$m" = ppo_static ] && engine=(--model.init_args.rollout_engine=static
        --model.init_args.reuse_rollout_logprobs=true --model.init_args.rollout_compile=true)
      run "${m}_$s" $port -c configs/ppo/smollm2.yaml -c "configs/strategy/$s.yaml" "${engine[@]}" \
        --model.init_args.model_name_or_path="$MODEL" --model.init_args.reward_model_name_or_path="$MODEL" \
        --model.init_args.max_iterations="$ITERS" --model.init_args.critic_warmup_iters=0 \
        --model.init_args.max_new_tokens=64 --model.init_args.mini_batch_size=16 --model.init_args.lr=1e-5 \
        --data.init_args.batch_size=32 --data.init_args.max_train_rows=256 \
        "--trainer.callbacks=[{\"class_path\": \"callbacks.adaptive_kl.AdaptiveKLController\", \"init_args\": {\"target\": 6.0, \"horizon\": 10000}}, $(summary_cb "${m}_$s")]" &
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
  done
done
wait
if [ "$PYTEST" = 1 ]; then
  say "start pytest -m gpu"
  timeout 420 "$PY" -m pytest -m gpu tests/test_gpu_strategies.py -q -p no:cacheprovider >"$OUT/pytest_gpu.log" 2>&1
  say "end pytest rc=$?"
  tail -n 5 "$OUT/pytest_gpu.log"
fi
"$PY" - "$OUT" <<'EOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':24} {'steps':>5} {'s/step':>7} {'peak GiB':>8}  first -> last")
for log in sorted(out.glob("*_*.log")):
    name = log.stem
    if name.startswith("pytest"):
        continue
    summary = out / name / "summary.json"
    if not summary.exists():
        print(f"{name:24} FAILED: " + " | ".join(log.read_text().strip().splitlines()[-3:])[-600:])
        continue
    s = json.loads(summary.read_text())
    keys = [k for k in s["metrics"] if re.fullmatch(r"train/loss|val/accuracy|score/mean|kl|policy/loss|value/loss", k)]
    m = " ".join(f"{k}={s['first_metrics'].get(k, float('nan')):.4g}->{s['metrics'][k]:.4g}" for k in sorted(keys))
    print(f"{name:24} {s['steps']:>5} {s['median_step_s']:>7} {s['peak_mem_gib']:>8}  {m}")
EOF
