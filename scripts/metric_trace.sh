#!/usr/bin/env bash
# The regression guard of refactors: run the tiny PPO config, the contrastive baseline pass + contrastive PPO and the
# main job with the code in CODE_DIR, and dump every logged scalar (scripts/tb_scalars.py) to OUT_DIR/{runs,pipeline}.txt.
# Run it for two commits on one machine (e.g. in two `git worktree`s) and compare the dumps; the baseline files
# (OUT_DIR/baseline.jsonl) should be byte-identical too.
#   bash scripts/metric_trace.sh /path/to/old_checkout /tmp/trace_old
#   bash scripts/metric_trace.sh .                      /tmp/trace_new
#   diff /tmp/trace_old/runs.txt /tmp/trace_new/runs.txt   # new metrics show as added lines only
set -euo pipefail
code=$(cd "$1" && pwd); out=$2
tools=$(cd "$(dirname "$0")" && pwd)
rm -rf "$out"; mkdir -p "$out"; out=$(cd "$out" && pwd)
cd "$code"
export PYTHONPATH="$code" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
py=$(command -v python || command -v python3)
$py cli.py fit -c configs/ppo/tiny.yaml --trainer.logger.init_args.save_dir="$out/runs" > "$out/ppo.log" 2>&1
$py cli.py predict -c configs/contrastive/baseline.yaml --trainer.logger.init_args.save_dir="$out/runs" \
    --model.init_args.output_path="$out/baseline.jsonl" > "$out/baseline.log" 2>&1
$py cli.py fit -c configs/contrastive/tiny.yaml --trainer.logger.init_args.save_dir="$out/runs" \
    --model.init_args.baseline_path="$out/baseline.jsonl" > "$out/contrastive.log" 2>&1
$py -m lightning_rlhf.pipeline --root "$out/pipeline" > "$out/pipeline.log" 2>&1
$py "$tools/tb_scalars.py" "$out/runs" > "$out/runs.txt"
$py "$tools/tb_scalars.py" "$out/pipeline" > "$out/pipeline.txt"
echo "traces: $out/runs.txt ($(wc -l < "$out/runs.txt") scalars), $out/pipeline.txt ($(wc -l < "$out/pipeline.txt") scalars)"
