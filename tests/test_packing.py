"""Packing: padding-free scoring and greedy-packed rows give the same log-probs, scores, losses and gradients as the
padded batch (DPO, reward model, MetaRM, AIHF's reward step, SFT), left and right padding."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_rlhf.cli import main
from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule
from lightning_rlhf.methods import DPOModule, MetaRewardModelModule, RewardModelModule, SFTModule
from lightning_rlhf.packing import first_fit_rows, pack_sequences, packed_sequence_logprobs, packed_token_nll
from lightning_rlhf.losses.sft import masked_nll_sum
from lightning_rlhf.rollout.scoring import position_ids_from_attention_mask, sequence_logprobs
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = [9, 4, 7]
    L = max(lengths)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    loss = torch.zeros(3, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(L - n, L) if side == "left" else slice(0, n)
        ids[i, cols] = torch.randint(3, 64, (n,), generator=g)
        mask[i, cols] = 1
        row_loss = torch.zeros(n, dtype=torch.long)
        row_loss[n // 2 :] = 1  # the "response": second half (real data never scores a sequence's first token)
        loss[i, cols] = row_loss
    return ids, mask, loss


def test_first_fit_rows_by_hand():
    assert first_fit_rows([5, 3, 4, 2, 6], capacity=8) == [[3, 4], [0, 1], [2]]  # 6+2, 5+3, 4
    assert first_fit_rows([5, 3, 4, 2, 6], capacity=8, decreasing=False) == [[0, 1], [2, 3], [4]]
    assert first_fit_rows([9, 1], capacity=4) == [[0], [1]]  # too long for a row: a row of its own


@pytest.mark.parametrize("row_length", [None, 11])
@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_sequence_logprobs_equal_the_padded_ones(tiny_llama, side, row_length):
    ids, mask, loss = _batch(side)
    tiny_llama.eval()
    with torch.no_grad():
        padded = tiny_llama(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                            use_cache=False).logits
        packed = pack_sequences(ids, mask, loss, row_length=row_length)
        packed_logits = tiny_llama(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                   use_cache=False).logits
    tiny_llama.train()
    assert packed.num_sequences == 3
    if row_length is None:  # one row, no padding at all
        assert packed.input_ids.shape == (1, int(mask.sum()))
        assert packed.position_ids[0].tolist() == list(range(9)) + list(range(4)) + list(range(7))
    else:  # lengths 9, 4, 7 in rows of at most 11 (first fit decreasing): [9 + 2 pads], [4 + 7]
        assert packed.segment.tolist() == [[0] * 9 + [-1] * 2, [1] * 4 + [2] * 7]
        assert packed.position_ids.tolist() == [list(range(9)) + [0, 0], list(range(4)) + list(range(7))]
    expected = sequence_logprobs(padded, ids, loss)
    torch.testing.assert_close(packed_sequence_logprobs(packed_logits, packed), expected, atol=1e-5, rtol=0)
    nll, n = masked_nll_sum(padded, ids, loss)
    packed_nll, packed_n = packed_token_nll(packed_logits, packed)
    torch.testing.assert_close(packed_nll, nll, atol=1e-5, rtol=0)
    assert int(packed_n) == int(n)
    # a first token marked for scoring is skipped: the logits before it belong to the previous sequence
    seg = packed.segment
    starts = torch.cat([torch.ones_like(seg[:, :1], dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], dim=1)
    first = packed._replace(loss_mask=(seg >= 0).long())
    no_first = packed._replace(loss_mask=((seg >= 0) & ~starts).long())
    torch.testing.assert_close(packed_sequence_logprobs(packed_logits, first),
                               packed_sequence_logprobs(packed_logits, no_first))


def test_dpo_padding_free_gives_the_padded_loss_and_gradients():
    modules = []
    for padding_free in (False, True):
        torch.manual_seed(0)
        module = DPOModule(padding_free=padding_free, export_dir=None)
        module.configure_model()
        modules.append(module)
    modules[1].load_state_dict(modules[0].state_dict(), strict=False)
    dm = PreferenceDataModule(max_train_rows=6, batch_size=6, max_length=128, max_prompt_length=100,
                              skip_invalid_rows=True, seed=3)
    dm.set_tokenizer(modules[0].tokenizer)
    dm.setup("fit")
    batch = dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])
    assert int(batch.attention_mask.sum()) < batch.attention_mask.numel()  # the padded batch has padding
    losses, grads = [], []
    for module in modules:
        module.policy.train()
        out = module.dpo_outputs(batch, "train")
        loss = out.losses.mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_free_dpo_trains_from_the_cli_and_is_refused_without_support(in_tmp, monkeypatch):
    cli = main(["fit", "-c", str(REPO / "configs" / "dpo" / "tiny.yaml"), "--model.init_args.padding_free=true",
                "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    assert cli.model.padding_free and cli.trainer.global_step == 2
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))
    import lightning_rlhf.methods.dpo as dpo_module

    monkeypatch.setattr(dpo_module, "packed_sequences_supported", lambda: False)
    with pytest.raises(ValueError, match="padding_free needs a transformers version"):
        DPOModule(padding_free=True, export_dir=None)


# ---------------------------------------------------------------------------------------------- reward model family
def _twins(cls, flags: dict, **kwargs):
    """A padded and a packed module of ``cls`` with the same weights."""
    modules = []
    for extra in ({}, flags):
        torch.manual_seed(0)
        module = cls(export_dir=None, **kwargs, **extra)
        module.configure_model()
        module.manual_backward = lambda loss: loss.backward()  # no trainer attached
        modules.append(module)
    modules[1].load_state_dict(modules[0].state_dict())
    return modules


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def _preferences(tokenizer, side: str, rows: int = 6):
    dm = PreferenceDataModule(max_train_rows=rows, batch_size=rows, max_length=128, max_prompt_length=100,
                              skip_invalid_rows=True, seed=3, padding_side=side)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    batch = dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])
    assert int(batch.attention_mask.sum()) < batch.attention_mask.numel()  # the padded batch has padding
    return batch


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("row_length,lm_coef", [(None, 0.0), (0, 0.0), (None, 0.5)])
def test_reward_model_padding_free_gives_the_padded_loss_and_gradients(side, row_length, lm_coef):
    padded, packed = _twins(RewardModelModule, {"padding_free": True, "pack_row_length": row_length},
                            lm_coef=lm_coef, center_coef=0.1, micro_batch_size=4)
    batch = _preferences(padded.tokenizer, side)
    results = []
    for module in (padded, packed):
        module.reward_model.train()
        total, r_w, r_l = module.preference_backward(batch)  # two micro-batches of 4 and 2 pairs
        results.append((total, r_w, r_l, _grads(module.reward_model)))
    for got, expected in zip(results[1][:3], results[0][:3]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    _assert_same_grads(results[1][3], results[0][3])


@pytest.mark.parametrize("meta_order", ["first", "second"])
def test_meta_rm_padding_free_takes_the_padded_step(meta_order):
    from tests.test_meta_rm import _params, fit_steps, preference_batch, sample_batch

    results = []
    for padding_free in (False, True):
        torch.manual_seed(0)
        module = MetaRewardModelModule(lr=0.5, meta_lr=2.0, meta_order=meta_order, max_grad_norm=None,
                                       export_dir=None, padding_free=padding_free, pack_row_length=0)
        prefs, samples = preference_batch(module.tokenizer), sample_batch(module.tokenizer)
        assert int(samples.attention_mask.sum()) < samples.attention_mask.numel()
        fit_steps(module, [{"preferences": prefs, "samples": samples}], double=False)
        assert module.meta_steps == 1
        results.append(_params(module))
    for n, p in results[0].items():  # one SGD step: equal parameters = equal meta + outer gradients
        torch.testing.assert_close(results[1][n], p, atol=1e-5, rtol=1e-4, msg=n)


def test_aihf_reward_step_padding_free_gives_the_padded_loss_and_gradients():
    from tests.test_aihf import _data, _reward_step, _rlhf_module

    out = []
    for padding_free in (False, True):
        module = _rlhf_module(w_D=0.5, w_P=1.0, reward_padding_free=padding_free)
        module.reward_model.forward = functools.partial(type(module.reward_model).forward, module.reward_model,
                                                        row_length=0)  # one row: several sequences share it
        batch = _data(module)
        out.append(_reward_step(module, batch["preferences"], batch["demonstrations"].slice(0, 3)))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=0)
    _assert_same_grads(out[1][1], out[0][1])


# ---------------------------------------------------------------------------------------------------------------- SFT
def _demonstrations(tokenizer, side: str, packing: str = "none", rows: int = 6, max_length: int = 256):
    dm = DemonstrationDataModule(max_train_rows=rows, batch_size=rows, max_length=max_length, max_prompt_length=200,
                                 skip_invalid_rows=True, seed=3, padding_side=side, packing=packing)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    return dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])


def _sft_loss_and_grads(module: SFTModule, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-mean NLL of ``batch`` and its gradients, as ``training_step`` forms them (micro-batches of 2 rows)."""
    module.policy.zero_grad(set_to_none=True)
    num_tokens = batch.loss_mask[:, 1:].sum()
    total = torch.zeros(())
    for s, e in module.micro_batches(len(batch)):
        _, nll, _ = module.token_logits_and_nll(batch.slice(s, e))
        (nll / num_tokens).backward()
        total += nll.detach() / num_tokens
    return total, _grads(module.policy)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sft_padding_free_and_greedy_packing_give_the_padded_loss_and_gradients(side):
    padded, free = _twins(SFTModule, {"packing": "padding_free"}, micro_batch_size=2)
    one_row = _twins(SFTModule, {"packing": "padding_free", "pack_row_length": 0}, micro_batch_size=2)[1]
    greedy = _twins(SFTModule, {"packing": "greedy"}, micro_batch_size=2)[1]
    for module in (greedy, one_row):
        module.load_state_dict(padded.state_dict())
    batch = _demonstrations(padded.tokenizer, side)
    assert int(batch.attention_mask.sum()) < batch.attention_mask.numel()
    # the same six examples greedily packed into rows of at most 256 tokens (the data module's collate)
    rows = _demonstrations(padded.tokenizer, side, packing="greedy")
    assert rows.position_ids is not None and len(rows) < len(batch)
    assert int(rows.attention_mask.sum()) == int(batch.attention_mask.sum())
    assert int(rows.loss_mask[:, 1:].sum()) == int(batch.loss_mask[:, 1:].sum())  # no response token lost
    loss, grads = _sft_loss_and_grads(padded, batch)
    for module, b in ((free, batch), (one_row, batch), (greedy, rows)):
        got_loss, got_grads = _sft_loss_and_grads(module, b)
        torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=0)
        _assert_same_grads(got_grads, grads)


def test_greedy_rows_by_hand():
    from lightning_rlhf.data.modules import greedy_pack

    batch = greedy_pack([[5, 6, 7], [8, 9], [3, 4, 4, 4]], [1, 1, 2], [0, 1, 1], row_length=6, pad_id=0)
    # first fit decreasing: [3,4,4,4] opens row 0, [5,6,7] row 1, [8,9] fits after [3,4,4,4]
    assert batch.input_ids.tolist() == [[8, 9, 3, 4, 4, 4], [5, 6, 7, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch.domain_ids.tolist() == [1, 0]


# ------------------------------------------------------------------------------------------------------ from the CLI
def test_packed_reward_model_and_sft_train_from_the_cli(in_tmp):
    rm = main(["fit", "-c", str(REPO / "configs" / "rm" / "tiny.yaml"), "--model.init_args.padding_free=true",
               "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"])
    assert rm.model.padding_free and rm.trainer.global_step == 2
    assert 0.0 <= float(rm.trainer.callback_metrics["val/accuracy"]) <= 1.0
    for packing in ("padding_free", "greedy"):
        data = ["--data.init_args.packing=greedy"] if packing == "greedy" else []
        sft = main(["fit", "-c", str(REPO / "configs" / "sft" / "tiny.yaml"), f"--model.init_args.packing={packing}",
                    *data, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                    "--trainer.val_check_interval=2"])
        assert sft.trainer.global_step == 2
        assert torch.isfinite(torch.tensor(float(sft.trainer.callback_metrics["train/loss"])))
        assert torch.isfinite(torch.tensor(float(sft.trainer.callback_metrics["val/perplexity"])))
    with pytest.raises(ValueError, match="data.packing: none disagree"):
        main(["fit", "-c", str(REPO / "configs" / "sft" / "tiny.yaml"), "--model.init_args.packing=greedy",
              "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])


def test_fused_adamw_takes_the_default_adamw_step():
    """``model.fused_adamw`` (the per-step fixed-cost cut measured in bench/README.md) changes only float rounding."""
    from tests.test_meta_rm import _params, fit_steps, preference_batch

    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        module = RewardModelModule(lr=1e-2, export_dir=None, fused_adamw=fused, padding_free=True)
        module.configure_model()
        start = _params(module)
        fit_steps(module, [preference_batch(module.tokenizer)] * 3, optimizer="adamw", steps=3, double=False)
        assert module.optimizers().optimizer.defaults["fused"] is (True if fused else None)
        results.append(_params(module))
    assert any(not torch.equal(results[0][n], start[n]) for n in start)  # the steps moved the parameters
    for n, p in results[0].items():
        torch.testing.assert_close(results[1][n], p, atol=1e-5, rtol=1e-4, msg=n)
