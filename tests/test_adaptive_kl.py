"""AdaptiveKLController on a tiny LightningModule that is not a PPO module: formula, clipping, checkpoint resume."""

from __future__ import annotations

from typing import Mapping

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.adaptive_kl import AdaptiveKLController
from callbacks.protocols import KLControlled

N_SEQ = 64  # sequences per "rollout"


class ToyKLModule(pl.LightningModule):
    """Implements KLControlled; step ``k`` reports KL ``kl_schedule[k % len]`` for ``N_SEQ`` sequences."""

    def __init__(self, kl_coef: float = 0.1, kl_schedule: tuple[float, ...] = (9.0,)) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.kl_coef = kl_coef
        self.kl_schedule = kl_schedule
        self.coefs_seen: list[float] = []
        self._stats: dict[str, float] = {}

    def last_rollout_stats(self) -> Mapping[str, float]:
        stats, self._stats = self._stats, {}
        return stats

    def training_step(self, batch, batch_idx):
        self.coefs_seen.append(self.kl_coef)
        kl = self.kl_schedule[self.global_step % len(self.kl_schedule)]
        self._stats = {"kl_seq_sum": kl, "kl_token_mean": kl / 10, "num_sequences": float(N_SEQ)}
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class NotKLModule(pl.LightningModule):
    """No kl_coef / last_rollout_stats."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2)


def _trainer(tmp_path, callbacks, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def _expected(beta: float, kl: float, n: float, target: float = 6.0, horizon: float = 10000.0) -> float:
    """The spec's formula, written out independently."""
    e = kl / target - 1.0
    e = 0.2 if e > 0.2 else (-0.2 if e < -0.2 else e)
    return beta * (1.0 + e * n / horizon)


@pytest.mark.parametrize(
    "kl,expected",
    [
        (6.6, 0.1 * (1 + 0.1 * 64 / 10000)),  # e = +0.1, inside the clip
        (5.4, 0.1 * (1 - 0.1 * 64 / 10000)),  # e = -0.1
        (30.0, 0.1 * (1 + 0.2 * 64 / 10000)),  # e = 4 clipped to +0.2
        (0.0, 0.1 * (1 - 0.2 * 64 / 10000)),  # e = -1 clipped to -0.2
        (6.0, 0.1),  # on target
    ],
)
def test_update_formula_both_directions_and_clipped(kl, expected):
    ctl = AdaptiveKLController(target=6.0, horizon=10000, init_kl_coef=0.1)
    ctl.kl_coef = 0.1
    assert ctl.update(kl, 64) == pytest.approx(expected, rel=1e-12)
    assert ctl.num_updates == 1 and ctl.total_sequences == 64


def test_token_mean_unit_reads_token_stat(tmp_path):
    module = ToyKLModule(kl_coef=0.2, kl_schedule=(0.3,))  # token mean 0.03 vs target 0.06 -> e = -0.5 -> -0.2
    ctl = AdaptiveKLController(target=0.06, horizon=1000, kl_unit="token_mean")
    _trainer(tmp_path, [ctl], max_steps=1).fit(module, _loader())
    assert module.kl_coef == pytest.approx(0.2 * (1 - 0.2 * 64 / 1000), rel=1e-12)


def test_setup_rejects_module_without_protocol(tmp_path):
    assert isinstance(ToyKLModule(), KLControlled) and not isinstance(NotKLModule(), KLControlled)
    with pytest.raises(TypeError, match="kl_coef.*last_rollout_stats|KLControlled"):
        _trainer(tmp_path, [AdaptiveKLController()], max_steps=1).fit(NotKLModule(), _loader())


def test_fit_moves_beta_and_resume_continues_from_saved_beta(tmp_path):
    schedule = (9.0, 3.0, 6.6)  # up (clipped), down (clipped), up (+0.1)
    module = ToyKLModule(kl_coef=0.1, kl_schedule=schedule)
    ctl = AdaptiveKLController(target=6.0, horizon=10000)
    trainer = _trainer(tmp_path, [ctl], max_steps=3)
    trainer.fit(module, _loader())
    beta = 0.1
    expected_seen = []
    for k in range(3):
        expected_seen.append(beta)
        beta = _expected(beta, schedule[k], N_SEQ)
    assert module.coefs_seen == pytest.approx(expected_seen, rel=1e-12)
    assert module.kl_coef == pytest.approx(beta, rel=1e-12) and ctl.kl_coef == module.kl_coef
    assert float(trainer.callback_metrics["kl_ctl/next_kl_coef"]) == pytest.approx(beta, rel=1e-6)
    ckpt = tmp_path / "kl.ckpt"
    trainer.save_checkpoint(ckpt)
    saved_beta = beta

    # resume: fresh module and controller with different initial coefficients; the saved beta must win
    module2 = ToyKLModule(kl_coef=0.5, kl_schedule=schedule)
    ctl2 = AdaptiveKLController(target=6.0, horizon=10000, init_kl_coef=0.9)
    _trainer(tmp_path, [ctl2], max_steps=5).fit(module2, _loader(), ckpt_path=ckpt)
    assert module2.coefs_seen[0] == pytest.approx(saved_beta, rel=1e-12)
    for k in range(3, 5):
        beta = _expected(beta, schedule[k % 3], N_SEQ)
    assert module2.kl_coef == pytest.approx(beta, rel=1e-12)
    assert ctl2.num_updates == 5 and ctl2.total_sequences == 5 * N_SEQ
