"""token_logprobs: the chunked, memory-saving log_softmax-gather matches the plain formula, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_rlhf.rollout import scoring
from lightning_rlhf.rollout.scoring import shifted_token_logprobs, token_logprobs


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.gather(F.log_softmax(logits.double(), -1), -1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk", [1 << 26, 7 * 11])  # one chunk; one row per chunk (7 x 11 elements < a row)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_log_softmax(chunk, dtype, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    base = (torch.randn(5, 8, 11) * 3).to(dtype)
    ids = torch.randint(0, 11, (5, 8))
    grad_out = torch.randn(5, 7)

    x = base.clone().requires_grad_(True)
    ours = shifted_token_logprobs(x, ids)  # a non-contiguous slice of the logits goes in
    (ours * grad_out).sum().backward()

    y = base.double().requires_grad_(True)
    ref = reference(y[:, :-1], ids[:, 1:])
    (ref * grad_out.double()).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (5, 7)
    torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 gradients are rounded to bf16
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), y.grad, atol=tol, rtol=tol)
    assert torch.all(x.grad[:, -1] == 0)  # the last position scores nothing


def test_hand_worked_case_and_no_grad_path():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # (1, 2, 2)
    labels = torch.tensor([[0, 1]])
    expected = torch.tensor([[-torch.log(torch.tensor(2.0)), -(2.0 + torch.log1p(torch.exp(torch.tensor(-2.0))))]])
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(logits, labels), expected)
    x = logits.clone().requires_grad_(True)
    token_logprobs(x, labels).sum().backward()
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(x.grad, torch.nn.functional.one_hot(labels, 2).float() - p)
