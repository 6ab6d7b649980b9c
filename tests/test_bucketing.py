"""Length bucketing (``data.length_bucketing``): batches of similar length, the same examples per epoch, and the
resume / rank-independence guarantees of the resumable sampler kept."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.data.resumable import ResumableSampler


def test_hand_worked_order():
    lengths = [5, 1, 4, 2, 6, 3]
    # one window of 3 global batches of 2: sorted longest first -> [4, 0, 2, 5, 3, 1], kept in order (no shuffle)
    s = ResumableSampler(range(6), shuffle=False, global_batch_size=2, lengths=lengths, bucket_window=3)
    assert list(s) == [4, 0, 2, 5, 3, 1]
    # windows of one batch: each pair sorted inside itself only
    s = ResumableSampler(range(6), shuffle=False, global_batch_size=2, lengths=lengths, bucket_window=1)
    assert list(s) == [0, 1, 2, 3, 4, 5]
    # 7 examples, batches of 2: the 7th (from the random order, here the last) is the dropped tail
    s = ResumableSampler(range(7), shuffle=False, global_batch_size=2, lengths=lengths + [9], bucket_window=3)
    assert list(s) == [4, 0, 2, 5, 3, 1]


def _padding(order: list[int], lengths: list[int], G: int) -> int:
    """Pad tokens when every batch of G is padded to its longest example (a simple loop, independent of the sampler)."""
    total = 0
    for i in range(0, len(order) - len(order) % G, G):
        batch = [lengths[j] for j in order[i : i + G]]
        total += max(batch) * len(batch) - sum(batch)
    return total


def test_same_examples_less_padding_and_new_order_each_epoch():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    plain = ResumableSampler(range(1000), seed=3, global_batch_size=16)
    bucketed = ResumableSampler(range(1000), seed=3, global_batch_size=16, lengths=lengths, bucket_window=8)
    p, b = list(plain), list(bucketed)
    assert len(b) == len(p) == 992 and len(set(b)) == 992  # whole batches, each example at most once
    assert sorted(b) == sorted(p)  # the same examples: the dropped tail is taken from the same random order
    assert _padding(b, lengths, 16) < 0.2 * _padding(p, lengths, 16)
    bucketed.set_epoch(1)
    b1 = list(bucketed)
    assert b1 != b and _padding(b1, lengths, 16) < 0.2 * _padding(p, lengths, 16)


def test_ranks_split_whole_global_batches_and_resume_continues_exactly():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(203)]
    one = list(ResumableSampler(range(203), seed=7, global_batch_size=8, lengths=lengths))
    ranks = [list(ResumableSampler(range(203), num_replicas=2, rank=r, seed=7, global_batch_size=8, lengths=lengths))
             for r in (0, 1)]
    for i in range(len(one) // 8):  # batch i of both ranks (4 each) == positions [8i, 8i+8) of one process
        assert sorted(ranks[0][4 * i : 4 * i + 4] + ranks[1][4 * i : 4 * i + 4]) == sorted(one[8 * i : 8 * i + 8])
    s = ResumableSampler(range(203), seed=7, global_batch_size=8, lengths=lengths)
    state = s.state_dict(samples_consumed=40)
    resumed = ResumableSampler(range(203), seed=7, global_batch_size=8, lengths=lengths)
    resumed.load_state_dict(state)
    assert list(resumed) == one[40:]
    plain = ResumableSampler(range(203), seed=7, global_batch_size=8)
    plain.load_state_dict(state)  # a bucketed checkpoint does not resume mid-epoch into a plain order
    assert list(plain) == list(ResumableSampler(range(203), seed=7, global_batch_size=8))


def test_bad_arguments():
    with pytest.raises(ValueError, match="lengths has 3 entries"):
        ResumableSampler(range(4), global_batch_size=2, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="needs global_batch_size"):
        ResumableSampler(range(4), lengths=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="bucket_window"):
        ResumableSampler(range(4), global_batch_size=2, lengths=[1, 2, 3, 4], bucket_window=0)
    with pytest.raises(ValueError, match="data.bucket_window"):
        PreferenceDataModule(bucket_window=0)


@pytest.mark.parametrize("cls", [PreferenceDataModule, DemonstrationDataModule, PromptDataModule])
def test_data_modules_pad_less_on_real_text(cls, tokenizer):
    def padded_and_real(bucketing: bool) -> tuple[int, int, list[int]]:
        """Token slots and real tokens over one epoch of training batches, and the example indices seen."""
        dm = cls(max_train_rows=400, batch_size=16, max_length=256, max_prompt_length=192, skip_invalid_rows=True,
                 length_bucketing=bucketing)
        dm.set_tokenizer(tokenizer)
        dm.setup("fit")
        padded = real = 0
        loader = dm.train_dataloader()
        for batch in loader:
            padded += batch.attention_mask.numel()
            real += int(batch.attention_mask.sum())
        return padded, real, list(loader.sampler)

    p_plain, r_plain, seen_plain = padded_and_real(False)
    p_buck, r_buck, seen_buck = padded_and_real(True)
    assert r_plain == r_buck and sorted(seen_plain) == sorted(seen_buck)  # the same tokens are trained on
    assert p_buck - r_buck < 0.5 * (p_plain - r_plain)  # far fewer pad tokens


def test_micro_batches_drop_their_shared_padding():
    from lightning_rlhf.data.batches import PreferenceBatch, TokenBatch, occupied_columns

    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert occupied_columns(mask[:2]) == slice(0, 3) and occupied_columns(mask) == slice(0, 5)
    assert occupied_columns(mask.flip(1)[:2]) == slice(2, 5)  # left padding
    assert occupied_columns(torch.zeros(2, 4)) == slice(0, 4)
    ids = torch.arange(20).view(4, 5)
    # pairs: rows 0-1 chosen, rows 2-3 rejected; pair 0 = rows 0 and 2, pair 1 = rows 1 and 3
    pb = PreferenceBatch(ids, mask, mask, torch.tensor([0, 1]))
    mb = pb.slice(1, 2)  # rows 1 and 3: longest has 3 tokens
    assert mb.input_ids.tolist() == [[5, 6, 7], [15, 16, 17]] and mb.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    tb = TokenBatch(ids, mask, mask, torch.zeros(4, dtype=torch.long))
    assert tb.slice(0, 2).input_ids.tolist() == [[0, 1, 2], [5, 6, 7]]
