"""Loss functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_rlhf.losses.preference import bradley_terry_loss, dpo_loss, reward_centering_loss
from lightning_rlhf.losses.sft import masked_nll_sum
from lightning_rlhf.rollout.scoring import last_token_index, position_ids_from_attention_mask, sequence_logprobs


def test_bradley_terry_hand_values():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 2.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-2) = log(1 + e^2)
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(2))])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)
    assert bradley_terry_loss(chosen, rejected).mean().item() == pytest.approx((0.31326168751822286 + 2.1269280110429727) / 2)
    torch.testing.assert_close(reward_centering_loss(chosen, rejected), torch.tensor([1.0, 4.0]))


# policy chosen/rejected, reference chosen/rejected, beta = 0.5:
# chosen log-ratio = -1 - (-2) = 1, rejected log-ratio = -3 - (-2) = -1, h = 0.5 * (1 - (-1)) = 1.0
CASE = dict(
    policy_chosen_logps=torch.tensor([-1.0]),
    policy_rejected_logps=torch.tensor([-3.0]),
    ref_chosen_logps=torch.tensor([-2.0]),
    ref_rejected_logps=torch.tensor([-2.0]),
    beta=0.5,
)


def test_dpo_sigmoid_hand_value():
    out = dpo_loss(**CASE)
    assert out.logits.item() == pytest.approx(1.0)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # 0.3132616875
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_dpo_ipo_hand_value():
    # (h / beta - 1 / (2 beta))^2 = (2 - 1)^2 = 1
    assert dpo_loss(**CASE, loss_type="ipo").losses.item() == pytest.approx(1.0)


def test_dpo_hinge_hand_values():
    assert dpo_loss(**CASE, loss_type="hinge").losses.item() == pytest.approx(0.0)  # relu(1 - 1)
    case = dict(CASE, beta=0.2)  # h = 0.4 -> relu(0.6)
    assert dpo_loss(**case, loss_type="hinge").losses.item() == pytest.approx(0.6)


def test_dpo_label_smoothing_hand_value():
    # -(0.9) log sig(1) - 0.1 log sig(-1) = 0.9 * 0.31326 + 0.1 * 1.31326 = 0.41326
    out = dpo_loss(**CASE, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**CASE, loss_type="ipo", label_smoothing=0.1)


def _manual_seq_logp(logits, ids, mask):
    out = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                total += F.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
        out.append(total)
    return torch.tensor(out)


def test_sequence_logprobs_matches_loop_for_left_and_right_padding():
    torch.manual_seed(0)
    V = 11
    prompt, response = [3, 4, 5], [6, 7]
    seq = prompt + response
    T = 8
    # right padded: tokens first; left padded: padding first
    right = torch.tensor([seq + [0] * (T - len(seq))])
    left = torch.tensor([[0] * (T - len(seq)) + seq])
    mask_r = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0]])
    mask_l = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]])
    # logits depend only on the real prefix, so both paddings describe the same model
    base = torch.randn(len(seq), V)
    logits_r = torch.zeros(1, T, V)
    logits_r[0, : len(seq)] = base
    logits_l = torch.zeros(1, T, V)
    logits_l[0, T - len(seq) :] = base
    lr = sequence_logprobs(logits_r, right, mask_r)
    ll = sequence_logprobs(logits_l, left, mask_l)
    expected = F.log_softmax(base[2], -1)[6] + F.log_softmax(base[3], -1)[7]
    torch.testing.assert_close(lr, expected.view(1))
    torch.testing.assert_close(ll, expected.view(1))
    torch.testing.assert_close(lr, _manual_seq_logp(logits_r, right, mask_r))


def test_masked_nll_sum_matches_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9)
    ids = torch.randint(0, 9, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    nll, n = masked_nll_sum(logits, ids, mask)
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 9), target.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(nll, ref)
    assert n.item() == 5


def test_padding_helpers():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert last_token_index(mask).tolist() == [4, 2]
