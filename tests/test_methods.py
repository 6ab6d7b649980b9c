"""SFT, reward model and DPO: losses go down when overfitting a fixed small batch, parameters change, and
micro-batch accumulation gives the same update as the whole batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule
from lightning_rlhf.losses.preference import bradley_terry_loss
from lightning_rlhf.methods import DPOModule, RewardModelModule, SFTModule


def _trainer(tmp_path, steps):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )


def _dm(cls, module, n=8):
    dm = cls(max_train_rows=n, batch_size=n, max_length=256, max_prompt_length=200, skip_invalid_rows=True, seed=3)
    dm.set_tokenizer(module.tokenizer)
    dm.setup("fit")
    return dm


def _fixed_batch(dm):
    return dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _fit_and_compare(tmp_path, module, dm, loss_fn, steps=12):
    module.configure_model()
    batch = _fixed_batch(dm)
    with torch.no_grad():
        before = loss_fn(module, batch).item()
    p0 = _params(module)
    _trainer(tmp_path, steps).fit(module, datamodule=dm)
    with torch.no_grad():
        after = loss_fn(module, batch).item()
    changed = [n for n, p in _params(module).items() if not torch.equal(p, p0[n])]
    return before, after, changed


def sft_loss(module, batch):
    from lightning_rlhf.losses.sft import masked_nll_sum

    nll, n = masked_nll_sum(module.lm_forward(module.policy, batch.input_ids, batch.attention_mask), batch.input_ids, batch.loss_mask)
    return nll / n


def rm_loss(module, batch):
    module.reward_model.eval()
    r_w, r_l, _ = module.score_pairs(batch)
    return bradley_terry_loss(r_w, r_l).mean()


def dpo_loss_fn(module, batch):
    return module.dpo_outputs(batch, "none").losses.mean()


def test_sft_overfits_fixed_batch(tmp_path):
    module = SFTModule(lr=3e-3, export_dir=None)
    dm = _dm(DemonstrationDataModule, module)
    before, after, changed = _fit_and_compare(tmp_path, module, dm, sft_loss)
    assert after < before - 0.5, (before, after)
    assert len(changed) == len(_params(module))


def test_reward_model_overfits_fixed_batch(tmp_path):
    module = RewardModelModule(lr=3e-3, export_dir=None)
    dm = _dm(PreferenceDataModule, module)
    before, after, changed = _fit_and_compare(tmp_path, module, dm, rm_loss)
    assert after < before * 0.5, (before, after)
    assert sorted(changed) == sorted(_params(module))  # every trainable tensor (trunk and score head) moved


@pytest.mark.parametrize("loss_type,lr", [("sigmoid", 3e-3), ("ipo", 2e-4), ("hinge", 3e-3)])
def test_dpo_overfits_fixed_batch_and_reference_stays_frozen(tmp_path, loss_type, lr):
    # IPO regresses the log-ratio gap onto 1/(2 beta): a squared loss that overshoots at SFT-scale learning rates
    module = DPOModule(lr=lr, export_dir=None, loss_type=loss_type, beta=0.5)
    dm = _dm(PreferenceDataModule, module)
    module.configure_model()
    ref0 = {n: p.clone() for n, p in module.reference.named_parameters()}
    before, after, changed = _fit_and_compare(tmp_path, module, dm, dpo_loss_fn, steps=10)
    assert after < before * 0.7, (before, after)
    # every policy tensor moved, no reference tensor did
    assert sorted(changed) == sorted(n for n, p in module.policy.named_parameters(prefix="policy") if p.requires_grad)
    assert all(torch.equal(p, ref0[n]) for n, p in module.reference.named_parameters())


def test_dpo_at_init_has_zero_margin_and_log2_loss():
    module = DPOModule(export_dir=None)
    dm = _dm(PreferenceDataModule, module, n=4)
    module.configure_model()
    with torch.no_grad():
        out = module.dpo_outputs(_fixed_batch(dm), "none")
    torch.testing.assert_close(out.logits, torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.losses, torch.full((4,), 0.6931472), atol=1e-5, rtol=0)


def test_precomputed_reference_logprobs_match_live_ones(tmp_path):
    live = DPOModule(lr=1e-3, export_dir=None)
    cached = DPOModule(lr=1e-3, export_dir=None, precompute_ref_logprobs=True)
    losses = []
    for module in (live, cached):
        torch.manual_seed(0)
        dm = _dm(PreferenceDataModule, module)
        module.configure_model()
        _trainer(tmp_path, 3).fit(module, datamodule=dm)
        with torch.no_grad():
            losses.append(module.dpo_outputs(_fixed_batch(dm), "train").losses)
    assert cached.reference is None and "train" in cached._ref_cache
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_micro_batches_accumulate_to_the_full_batch_update(tmp_path):
    results = []
    for micro in (None, 2):
        torch.manual_seed(0)
        module = RewardModelModule(lr=1e-3, export_dir=None, micro_batch_size=micro)
        dm = _dm(PreferenceDataModule, module)
        module.configure_model()
        module.double()  # float64: summation-order rounding stays ~1e-16 relative, even through Adam
        _trainer(tmp_path, 1).fit(module, datamodule=dm)
        results.append(_params(module))
    # Adam's first step is lr * g / (|g| + eps): on an element whose gradient nearly cancels, float32 rounding of a
    # different summation order moved it by 1.4e-5 (1.4% of lr) on one machine. In float64 the two orders agree to
    # ~1e-14 here; a wrong accumulation (e.g. a missing 1/n) would differ by ~lr = 1e-3.
    for n, p in results[0].items():
        assert p.dtype == torch.float64, n
        torch.testing.assert_close(p, results[1][n], atol=1e-10, rtol=0)


def test_train_metrics_reach_the_logger_as_if_logged_every_step(tmp_path, monkeypatch):
    """self.log runs only on logging steps (a cost saving): the logger receives exactly what it receives when every
    step logs, and the last step's values are in callback_metrics."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    def run(name: str, every_step: bool) -> tuple[list[dict[str, str]], float, list[int]]:
        torch.manual_seed(0)
        module = RewardModelModule(lr=1e-3, export_dir=None)
        calls: list[int] = []
        original = module.log_train_step

        def spy(*args, **kwargs):
            calls.append(module.trainer.global_step)
            return original(*args, **kwargs)

        module.log_train_step = spy  # type: ignore[method-assign]
        if every_step:
            monkeypatch.setattr(RewardModelModule, "is_logging_step", lambda self: True)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, log_every_n_steps=2, limit_val_batches=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            logger=CSVLogger(tmp_path, name=name), default_root_dir=tmp_path)
        dm = PreferenceDataModule(max_train_rows=16, batch_size=2, max_length=128, max_prompt_length=100,
                                  skip_invalid_rows=True, seed=3)  # 8 batches an epoch: no epoch end in 5 steps
        trainer.fit(module, datamodule=dm)
        monkeypatch.undo()
        with open(trainer.logger.experiment.metrics_file_path) as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
        return rows, float(trainer.callback_metrics["train/loss"]), calls

    gated_rows, gated_last, gated_calls = run("gated", every_step=False)
    every_rows, every_last, every_calls = run("every", every_step=True)
    assert every_calls == [1, 2, 3, 4, 5] and gated_calls == [1, 2, 4, 5]  # first, every 2nd, last
    assert [r["step"] for r in gated_rows] == [r["step"] for r in every_rows] and len(gated_rows) >= 2
    for a, b in zip(gated_rows, every_rows):
        assert float(a["train/loss"]) == pytest.approx(float(b["train/loss"]), abs=1e-6)
    assert gated_last == pytest.approx(every_last, abs=1e-6)
