"""Safe handling of bad numbers and crashes: non-finite losses/rewards are skipped and counted (or stop the run with a
message naming the flag), a crash while saving never damages the previous checkpoint, every method's checkpoint
loads with ``torch.load(weights_only=True)``, and remote code is off unless asked for.

Unknown config keys and wrongly typed values failing at parse time are covered by tests/test_cli.py."""

from __future__ import annotations

import glob
import inspect
import io
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.preemption import CheckpointOnSigterm
from callbacks.rng_state import RNGStateCallback
from lightning_rlhf.checkpoint_io import AtomicCheckpointIO
from lightning_rlhf.cli import main
from lightning_rlhf.data import PreferenceDataModule
from lightning_rlhf.methods import DPOModule, RewardModelModule, SFTModule
from lightning_rlhf.methods.base import RLHFModule

REPO = Path(__file__).resolve().parent.parent
NAN_AT = 1  # iteration (0-based) whose loss is made NaN


def _dm(cls, module, n=8, batch_size=4):
    dm = cls(max_train_rows=n, batch_size=batch_size, max_length=128, max_prompt_length=96, skip_invalid_rows=True,
             seed=1)
    dm.set_tokenizer(module.tokenizer)
    return dm


def _trainer(tmp_path, steps, callbacks=()):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )


def _poison_dpo(module, monkeypatch):
    """NaN losses at iteration NAN_AT (as a numerically broken forward would give)."""
    original = module.dpo_outputs

    def dpo_outputs(batch, split):
        out = original(batch, split)
        if split == "train" and module.iteration == NAN_AT:
            out.losses = out.losses * float("nan")
        return out

    monkeypatch.setattr(module, "dpo_outputs", dpo_outputs)


def _poison_rm(module, monkeypatch):
    """An infinite reward at iteration NAN_AT."""
    original = module.score_pairs

    def score_pairs(batch):
        r_w, r_l, nll = original(batch)
        if module.reward_model.training and module.iteration == NAN_AT:
            r_w = r_w + float("inf")
        return r_w, r_l, nll

    monkeypatch.setattr(module, "score_pairs", score_pairs)


class _Snapshots(L.Callback):
    """Trainable parameters before and after every training step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _params(m):
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[pl_module.iteration] = self._params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[pl_module.iteration - 1] = self._params(pl_module)


@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_skip_mode_leaves_parameters_unchanged_counts_and_continues(method, tmp_path, monkeypatch):
    if method == "dpo":
        module, dm_cls, poison = DPOModule(lr=1e-3, export_dir=None), PreferenceDataModule, _poison_dpo
    else:
        module, dm_cls, poison = RewardModelModule(lr=1e-3, export_dir=None), PreferenceDataModule, _poison_rm
    assert module.on_nonfinite == "skip"  # the default
    poison(module, monkeypatch)
    snaps = _Snapshots()
    trainer = _trainer(tmp_path, 3, [snaps])
    trainer.fit(module, datamodule=_dm(dm_cls, module))

    assert trainer.global_step == 3 and module.iteration == 3  # training went on after the bad step
    assert module.nonfinite_steps == 1
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 1.0
    for n, p in snaps.after[NAN_AT].items():
        assert torch.equal(p, snaps.before[NAN_AT][n]), f"{n} changed in the skipped step"
        assert torch.isfinite(p).all()
    for it in (0, 2):  # the other steps did update
        assert any(not torch.equal(p, snaps.before[it][n]) for n, p in snaps.after[it].items())
    # Adam's state saw two real steps only
    opt = trainer.optimizers[0]
    assert {int(s["step"]) for s in opt.state.values()} == {2}
    # the counter is checkpointed
    path = tmp_path / "skip.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["nonfinite_steps"] == 1


def test_stop_mode_raises_naming_the_step_and_the_flag(tmp_path, monkeypatch):
    module = DPOModule(lr=1e-3, export_dir=None, on_nonfinite="stop")
    _poison_dpo(module, monkeypatch)
    with pytest.raises(RuntimeError) as e:
        _trainer(tmp_path, 3).fit(module, datamodule=_dm(PreferenceDataModule, module))
    msg = str(e.value)
    assert "model.on_nonfinite" in msg and f"optimizer step {NAN_AT}" in msg and "loss=nan" in msg, msg


def test_nonfinite_decision_is_shared_by_all_ranks():
    module = SFTModule(export_dir=None)
    finite = torch.tensor(1.0), torch.tensor(2.0)
    assert module._nonfinite_decision(*finite) is False
    assert module._nonfinite_decision(torch.tensor(float("nan")), None) is True
    assert module._nonfinite_decision(torch.tensor(1.0), torch.tensor(float("inf"))) is True

    class OtherRankSawNaN:  # what strategy.reduce(sum) returns when another rank's flag is 1
        def reduce(self, tensor, reduce_op):
            assert reduce_op == "sum"
            return tensor + 1.0

    class TwoRanks:
        world_size = 2
        strategy = OtherRankSawNaN()

    module._trainer = TwoRanks()
    assert module._nonfinite_decision(*finite) is True  # this rank is fine, but all ranks skip together


# ---------------------------------------------------------------------------------------------- atomic checkpoints
def _crashing_save(real_save):
    """A torch.save that writes half of the bytes and then dies (disk full, process killed)."""

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
            f.flush()
        raise OSError("simulated crash while writing the checkpoint")

    return save


def test_crash_during_save_keeps_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    ckpt_io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt_io.save_checkpoint({"state_dict": {"w": torch.ones(64, 64)}, "global_step": 1}, path)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", _crashing_save(real_save))
    with pytest.raises(OSError, match="simulated crash"):
        ckpt_io.save_checkpoint({"state_dict": {"w": torch.zeros(64, 64)}, "global_step": 2}, path)
    # control: the same crash writing straight to the file leaves a truncated, unloadable checkpoint
    naive = tmp_path / "naive.ckpt"
    real_save({"global_step": 1}, naive)
    with pytest.raises(OSError):
        torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, naive)
    monkeypatch.undo()

    state = ckpt_io.load_checkpoint(path, weights_only=True)
    assert state["global_step"] == 1 and torch.equal(state["state_dict"]["w"], torch.ones(64, 64))
    assert os.listdir(path.parent) == ["last.ckpt"]  # the temporary file was removed
    with pytest.raises(Exception):
        torch.load(naive, weights_only=True)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_save_goes_through_a_temporary_file_and_os_replace(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real_replace(a, b)))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        plugins=[AtomicCheckpointIO()])
    trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=2))
    target = tmp_path / "a" / "step1.ckpt"
    trainer.save_checkpoint(target)
    ((src, dst),) = [(a, b) for a, b in replaced if b == target]
    assert dst == target and src.parent == target.parent and src.name.startswith(".tmp-ckpt-")
    assert torch.load(target, weights_only=True)["global_step"] == 1


# ---------------------------------------------------------------------------------------------- CLI defaults
@pytest.mark.parametrize("method", ["sft", "rm", "dpo"])
def test_cli_checkpoints_load_with_weights_only_and_carry_resume_state(method, in_tmp):
    cli = main([
        "fit", "-c", str(REPO / "configs" / method / "tiny.yaml"), "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--data.max_train_rows=8", "--data.batch_size=4", "--data.max_length=128", "--data.max_prompt_length=96",
        "--data.skip_invalid_rows=true", "--model.export_dir=null", f"--trainer.default_root_dir={in_tmp}",
    ])
    trainer = cli.trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(cb, CheckpointOnSigterm) for cb in trainer.callbacks)
    assert any(isinstance(cb, RNGStateCallback) for cb in trainer.callbacks)
    (path,) = glob.glob(str(in_tmp / "checkpoints" / "*.ckpt"))
    state = torch.load(path, weights_only=True, map_location="cpu")  # no pickled classes anywhere
    assert state["iteration"] == 1 and state["nonfinite_steps"] == 0
    assert state["callbacks"]["RNGStateCallback"]["ranks"][0]["torch"].dtype == torch.uint8
    (dm_state,) = [v for k, v in state.items() if k.endswith("DataModule")]
    assert dm_state["train_sampler"]["consumed"] == 4
    assert not any(k.startswith("reference.") for k in state["state_dict"])  # frozen models stay out


def test_trust_remote_code_is_off_by_default_and_passed_to_from_pretrained(monkeypatch):
    assert inspect.signature(RLHFModule.__init__).parameters["trust_remote_code"].default is False
    import transformers

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    module = DPOModule(export_dir=None)
    assert module.trust_remote_code is False
    module.configure_model()  # policy and reference
    DPOModule(export_dir=None, trust_remote_code=True).configure_model()
    assert seen == [False, False, True, True]


def test_ppo_nonfinite_rewards_skip_the_iteration_and_keep_the_reward_moments_clean(tmp_path, monkeypatch):
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.methods import PPOModule

    module = PPOModule(
        reward_fn={"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}},
        lr=1e-3, critic_lr=1e-3, ppo_epochs=1, mini_batch_size=None, max_new_tokens=6, max_iterations=3,
        log_samples_every_n=0, export_dir=None,
    )
    original = module.score
    monkeypatch.setattr(module, "score", lambda exp: original(exp) * (float("nan") if module.iteration == NAN_AT else 1))
    data = PromptDataModule(batch_size=4, max_prompt_length=48, skip_invalid_rows=True, max_train_rows=16)
    snaps = _Snapshots()
    trainer = _trainer(tmp_path, -1, [snaps])
    trainer.fit(module, data)
    assert module.iteration == 3 and module.nonfinite_steps == 1  # one optimizer step per iteration here
    for n, p in snaps.after[NAN_AT].items():
        assert torch.equal(p, snaps.before[NAN_AT][n]), n
    assert any(not torch.equal(p, snaps.before[2][n]) for n, p in snaps.after[2].items())  # training went on
    assert float(module.reward_count) == 8 and torch.isfinite(module.reward_mean) and torch.isfinite(module.reward_var)
