"""Padding-free (packed) scoring: the same sequence log-probs, DPO loss and gradients as the padded batch."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.cli import main
from lightning_rlhf.data import PreferenceDataModule
from lightning_rlhf.methods import DPOModule
from lightning_rlhf.rollout.scoring import (
    pack_sequences,
    packed_sequence_logprobs,
    position_ids_from_attention_mask,
    sequence_logprobs,
)
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


@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_sequence_logprobs_equal_the_padded_ones(tiny_llama, side):
    ids, mask, loss = _batch(side)
    tiny_llama.eval()
    with torch.no_grad():
        padded = tiny_llama(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                            use_cache=False).logits
        packed = pack_sequences(ids, mask, loss)
        packed_logits = tiny_llama(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                   use_cache=False).logits
    tiny_llama.train()
    assert packed.input_ids.shape == (1, int(mask.sum())) and packed.num_sequences == 3
    assert packed.position_ids[0].tolist() == list(range(9)) + list(range(4)) + list(range(7))
    expected = sequence_logprobs(padded, ids, loss)
    torch.testing.assert_close(packed_sequence_logprobs(packed_logits, packed), expected, atol=1e-5, rtol=0)
    # a first token marked for scoring is skipped: the logits before it belong to the previous sequence
    first = packed._replace(loss_mask=torch.ones_like(packed.loss_mask))
    starts = torch.cat([torch.tensor([True]), packed.segment[1:] != packed.segment[:-1]])
    no_first = packed._replace(loss_mask=(~starts).long())
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
