"""Non-finite rewards are caught where they enter, reported with their rows, and dropped from the PPO update (or stop
the run naming the reward source); a run that drops most of its samples fails at the end (issue 15, item 3)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from safetensors.torch import load_file

from lightning_rlhf.cli import main
from lightning_rlhf.models.factory import resolve_pretrained
from lightning_rlhf.rewards import NonFiniteRewardError, RewardFunction, check_scores

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 3
BATCH = 4


class NaNForSomeRows(RewardFunction):
    """Test reward: the response length in characters, except NaN for rows ``i`` with ``i % every < nan_rows``."""

    def __init__(self, every: int = 4, nan_rows: int = 1) -> None:
        self.every, self.nan_rows = every, nan_rows

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **extras: Any) -> list[float]:
        return [math.nan if i % self.every < self.nan_rows else float(len(r)) for i, r in enumerate(responses)]


def _args(nan_rows: int = 1, *extra: str) -> list[str]:
    reward = {"class_path": "tests.test_nonfinite_rewards.NaNForSomeRows", "init_args": {"nan_rows": nan_rows}}
    return [
        "fit", "-c", str(REPO / "configs" / "ppo" / "tiny.yaml"), f"--model.init_args.reward_fn={json.dumps(reward)}",
        f"--data.init_args.batch_size={BATCH}", "--data.init_args.max_train_rows=16",
        f"--model.init_args.max_iterations={ITERATIONS}", "--model.init_args.ppo_epochs=1",
        "--model.init_args.mini_batch_size=null", "--model.init_args.micro_batch_size=null",
        "--model.init_args.max_new_tokens=8", "--model.init_args.log_samples_every_n=0",
        "--trainer.enable_progress_bar=false", "--model.init_args.export_dir=export", *extra,
    ]


def test_check_scores_names_rows_prompts_and_source(caplog):
    scores = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        keep = check_scores(scores, "model.reward_fn (my.Reward)", "drop", ["p0", "p1", "p2", "p3"], "iteration 5")
    assert keep.tolist() == [True, False, True, False]
    (record,) = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert ("Reward source model.reward_fn (my.Reward) returned 2 non-finite score(s) of 4 (iteration 5): "
            "row 1 (prompt id p1): nan, row 3 (prompt id p3): inf.") in record.getMessage()
    with pytest.raises(NonFiniteRewardError, match=r"model.reward_fn \(my.Reward\) returned 2 non-finite"):
        check_scores(scores, "model.reward_fn (my.Reward)", "fail")
    assert check_scores(torch.ones(3), "x", "fail").all()


def test_nan_rewards_are_reported_and_dropped_and_the_rest_trains(in_tmp, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        cli = main(_args(1))
    module = cli.model
    reports = [r.getMessage() for r in caplog.records if "non-finite score" in r.getMessage()]
    assert len(reports) == ITERATIONS
    for i, message in enumerate(reports):
        assert message.startswith(
            "Reward source model.reward_fn (tests.test_nonfinite_rewards.NaNForSomeRows) returned 1 non-finite "
            f"score(s) of {BATCH} (iteration {i}, rank 0): row 0 (prompt id ")
        assert "Dropped from the update" in message
    assert float(module.nonfinite_reward_samples) == ITERATIONS and float(module.scored_samples) == ITERATIONS * BATCH
    assert float(cli.trainer.callback_metrics["reward/nonfinite_dropped"]) == ITERATIONS
    # every update ran on the 3 finite samples: no optimizer step was skipped, the scores logged are finite
    assert module.nonfinite_steps == 0 and cli.trainer.global_step == ITERATIONS
    assert math.isfinite(float(cli.trainer.callback_metrics["score/mean"]))
    assert any("3 of 12 rollout samples dropped" in r.getMessage() for r in caplog.records)  # end-of-run summary
    init = load_file(str(Path(resolve_pretrained("builtin:tiny-llama")) / "model.safetensors"))
    trained = load_file(str(in_tmp / "export" / "model.safetensors"))
    layers = [k for k in init if k.startswith("model.layers.")]
    assert layers and any(not torch.equal(init[k], trained[k]) for k in layers)
    assert all(torch.isfinite(trained[k]).all() for k in trained)


def test_strict_option_fails_naming_the_reward_source(in_tmp):
    with pytest.raises(NonFiniteRewardError, match=r"model.reward_fn \(tests.test_nonfinite_rewards.NaNForSomeRows\) "
                                                   r"returned 1 non-finite score\(s\) of 4 \(iteration 0, rank 0\)"):
        main(_args(1, "--model.init_args.on_nonfinite_reward=fail"))
    assert not (in_tmp / "export").exists()


@pytest.mark.parametrize("nan_rows,summary", [
    (3, r"Most of this run's updates were skipped: 9 of 12 rollout samples dropped"),
    # nothing finite: the batch keeps its NaNs and the non-finite guard skips every optimizer step
    (4, r"Most of this run's updates were skipped: 3 of 3 optimizer steps skipped .*; 12 of 12 rollout samples"),
])
def test_a_run_that_drops_most_samples_fails_with_a_summary(in_tmp, nan_rows, summary):
    with pytest.raises(RuntimeError, match=summary):
        main(_args(nan_rows))
    assert not (in_tmp / "export").exists()


DDP_SCRIPT = r'''
import json, sys
import lightning as L
import torch
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.methods.ppo import PPOModule

L.seed_everything(0)
module = PPOModule(
    model_name_or_path="builtin:tiny-llama", lr=1e-2, critic_lr=1e-3, ppo_epochs=1, mini_batch_size=2,
    micro_batch_size=1, max_new_tokens=6, max_iterations=2, log_samples_every_n=0, export_dir=None,
    reward_fn={"class_path": "tests.test_nonfinite_rewards.NaNForSomeRows", "init_args": {"nan_rows": 1}},
)
module.configure_model()
init = torch.cat([p.detach().flatten().clone() for p in module.parameters() if p.requires_grad])
data = PromptDataModule(train_path="builtin:hh-rlhf", batch_size=4, max_prompt_length=48, skip_invalid_rows=True,
                        max_train_rows=32, max_val_rows=4)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=-1, logger=False, limit_val_batches=0,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, data)
flat = torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad])
spread = (trainer.strategy.all_gather(flat).std(0).max()).item()
if trainer.is_global_zero:
    json.dump({"spread": spread, "moved": (flat - init).abs().max().item(), "finite": bool(torch.isfinite(flat).all()),
               "dropped": float(module.nonfinite_reward_samples), "scored": float(module.scored_samples),
               "skipped_steps": module.nonfinite_steps, "global_step": trainer.global_step}, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_two_ranks_mask_nonfinite_samples_and_stay_in_sync(tmp_path):
    """Under DDP the rows stay (every rank runs the same minibatches) with an empty response mask: both ranks take
    the same finite updates. Two ranks x 2 iterations x 4 prompts, one NaN per rank and iteration."""
    import os
    import sys

    from tests.distributed import run_distributed

    script = tmp_path / "nan_ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = run_distributed([sys.executable, str(script), str(out)], cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["dropped"] == 4 and result["scored"] == 16 and result["skipped_steps"] == 0
    assert result["global_step"] == 4 and result["spread"] == 0.0 and result["finite"] and result["moved"] > 0
