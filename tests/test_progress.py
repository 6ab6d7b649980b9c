"""One progress bar per run with the run's true total: PPO counts iterations, the other methods optimizer steps."""

from __future__ import annotations

from pathlib import Path

from callbacks.progress import RunProgressBar
from lightning_rlhf.cli import main

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--model.init_args.export_dir=null",
         "--trainer.enable_model_summary=false"]


def _bar(cli) -> RunProgressBar:
    (bar,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RunProgressBar)]
    return bar


def test_ppo_bar_counts_iterations_to_max_iterations(in_tmp, capsys):
    cli = main(["fit", "-c", str(REPO / "configs" / "ppo" / "tiny.yaml"), *QUIET, "--data.init_args.batch_size=4",
                "--data.init_args.max_train_rows=16", "--model.init_args.max_iterations=2",
                "--model.init_args.ppo_epochs=2", "--model.init_args.mini_batch_size=2",
                "--model.init_args.micro_batch_size=2", "--model.init_args.max_new_tokens=4",
                "--model.init_args.log_samples_every_n=0"])
    bar = _bar(cli)._train_progress_bar
    assert cli.trainer.global_step == 8  # 2 iterations x 2 epochs x 2 minibatches: not what the bar counts
    assert (bar.n, bar.total, bar.unit, bar.desc.strip(": ")) == (2, 2, "it", "PPOModule")
    out = capsys.readouterr().out
    assert "Epoch 0/" not in out and "2/2" in out


def test_sft_bar_counts_optimizer_steps_across_epochs(in_tmp, capsys):
    # 8 rows, batch 4: 2 batches an epoch, so 5 steps cross two epoch ends; validation gets no bar of its own
    cli = main(["fit", "-c", str(REPO / "configs" / "sft" / "tiny.yaml"), *QUIET, "--data.init_args.batch_size=4",
                "--data.init_args.max_train_rows=8", "--trainer.max_steps=5", "--trainer.val_check_interval=1.0",
                "--data.init_args.max_val_rows=2", "--trainer.limit_val_batches=1"])
    bar = _bar(cli)._train_progress_bar
    assert cli.trainer.current_epoch >= 2
    assert (bar.n, bar.total, bar.unit) == (5, 5, "step")
    out = capsys.readouterr().out
    assert "5/5" in out and "Epoch" not in out and "Validation" not in out and "Sanity" not in out
