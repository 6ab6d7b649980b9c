"""The Experience container: consistent slicing of fields and extras, minibatches, cat, to."""

from __future__ import annotations

import torch

from lightning_rlhf.rollout.experience import Experience


def _experience(B: int = 5, P: int = 3, R: int = 4) -> Experience:
    rows = torch.arange(B, dtype=torch.float32)
    return Experience(
        sequences=torch.arange(B)[:, None].repeat(1, P + R),
        attention_mask=torch.ones(B, P + R, dtype=torch.long),
        action_mask=torch.ones(B, R, dtype=torch.long),
        prompt_length=P,
        logprobs=rows[:, None].repeat(1, R),
        values=rows[:, None].repeat(1, R) * 10,
        scores=rows.clone(),
        kl_coef=torch.full((B,), 0.1),
        extras={"prompt_id": [f"p{i}" for i in range(B)], "domain": tuple(range(B)), "tag": "same", "t": rows * 2},
    )


def test_minibatches_slice_every_field_consistently():
    exp = _experience()
    seen = []
    for mb in exp.minibatches(2, shuffle=True, generator=torch.Generator().manual_seed(0)):
        ids = mb.sequences[:, 0].tolist()
        seen += ids
        assert mb.scores.tolist() == ids
        assert mb.logprobs[:, 0].tolist() == ids and mb.values[:, 0].tolist() == [10 * i for i in ids]
        assert mb.extras["prompt_id"] == [f"p{i}" for i in ids]
        assert mb.extras["domain"] == tuple(ids) and mb.extras["tag"] == "same"
        assert mb.extras["t"].tolist() == [2 * i for i in ids]
        assert mb.ref_logprobs is None and mb.prompt_length == 3 and mb.response_length == 4
    assert sorted(seen) == list(range(5)) and seen != list(range(5))
    assert [len(mb) for mb in exp.minibatches(2, shuffle=False)] == [2, 2, 1]
    assert [len(mb) for mb in exp.minibatches(2, shuffle=False, drop_last=True)] == [2, 2]
    # same generator seed -> same order
    o1 = [mb.sequences[:, 0].tolist() for mb in exp.minibatches(2, generator=torch.Generator().manual_seed(3))]
    o2 = [mb.sequences[:, 0].tolist() for mb in exp.minibatches(2, generator=torch.Generator().manual_seed(3))]
    assert o1 == o2


def test_cat_pads_widths_and_to_moves():
    a = _experience(B=2, P=3, R=4)
    b = _experience(B=3, P=5, R=2)
    c = Experience.cat([a, b], pad_token_id=-1)
    assert len(c) == 5 and c.prompt_length == 5 and c.response_length == 4
    assert c.sequences[0, :2].tolist() == [-1, -1] and c.attention_mask[0, :2].sum() == 0
    assert c.action_mask[2:, 2:].sum() == 0 and c.logprobs[2:, 2:].abs().sum() == 0
    assert c.extras["prompt_id"] == ["p0", "p1", "p0", "p1", "p2"] and c.extras["t"].shape == (5,)
    moved = c.to("cpu")
    assert moved.sequences.device.type == "cpu" and moved.extras["tag"] == "same"
