"""MetaRM (spec 3): the difference loss against hand-worked numbers, the first-order update against an independent
computation, the second-order gradient against central finite differences, exact parameter restoration, micro-batch
accumulation, the vanilla step when the meta step is off, the validation metrics, and the strategy refusals.

The independent references score with the Hugging Face model's own sequence-classification pooling (the logit at the
last non-pad token of right-padded rows), write the losses as plain loops, and take gradients with ``torch.autograd``
on a deep copy of the model: nothing of MetaRewardModelModule is reused.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch.func import functional_call

from lightning_rlhf.data.batches import PreferenceBatch, SampleSetBatch, pad_sequences
from lightning_rlhf.losses.meta_rm import (
    difference_loss,
    normalized_difference_histogram,
    pairwise_abs_differences,
    within_prompt_std,
)
from lightning_rlhf.methods import MetaRewardModelModule, RewardModelModule

PROMPTS = ["Human: how do I boil an egg? Assistant:", "Human: name a colour. Assistant:",
           "Human: what is two plus two? Assistant:"]
PAIRS = [(" Put it in boiling water for eight minutes.", " No."), (" Blue.", " I will not answer that question."),
         (" Four.", " Five, or maybe six.")]
SAMPLES = [[" Boil it.", " Eggs are good for you and boiling is easy.", " Ten minutes."],
           [" Red.", " Green, like grass.", " I like colours."]]


# ------------------------------------------------------------------------------------------------ difference loss
def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_difference_loss_matches_hand_computed_value_for_k3():
    scores = torch.tensor([1.0, 0.0, 3.0, -2.0, -2.0, 0.5], dtype=torch.float64)  # B=2 prompts, k=3
    # prompt 0: |1-0|=1, |1-3|=2, |0-3|=3; prompt 1: 0, 2.5, 2.5
    want0 = 2 / 9 * (_sig(1) + _sig(2) + _sig(3))
    want1 = 2 / 9 * (_sig(0) + _sig(2.5) + _sig(2.5))
    got = difference_loss(scores, num_samples=3)
    torch.testing.assert_close(got, torch.tensor([want0, want1], dtype=torch.float64), atol=1e-12, rtol=0)
    pairs = difference_loss(scores.view(2, 3), difference_norm="pairs")
    torch.testing.assert_close(pairs, torch.tensor([want0, want1], dtype=torch.float64) * 9 / 6, atol=1e-12, rtol=0)
    smooth = difference_loss(scores, num_samples=3, abs_eps=1e-12)
    torch.testing.assert_close(smooth, got, atol=1e-7, rtol=0)  # sqrt(1e-12) = 1e-6 at d = 0
    assert pairwise_abs_differences(scores, 3).tolist() == [[1.0, 2.0, 3.0], [0.0, 2.5, 2.5]]


def test_difference_loss_gradient_pushes_scores_apart():
    scores = torch.tensor([[0.2, 0.0, -0.1]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(difference_loss(scores).sum(), scores)
    # d/dr_0 = 2/9 * (s'(0.2) + s'(0.3)) > 0, d/dr_2 = -2/9 * (s'(0.3) + s'(0.1)) < 0 (s' = sigmoid derivative)
    ds = lambda x: _sig(x) * (1 - _sig(x))  # noqa: E731
    want = [2 / 9 * (ds(0.2) + ds(0.3)), 2 / 9 * (-ds(0.2) + ds(0.1)), -2 / 9 * (ds(0.3) + ds(0.1))]
    torch.testing.assert_close(g[0], torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    # the smooth |d| has a zero gradient at d = 0 like |d|, and is finite there
    tied = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    (g0,) = torch.autograd.grad(difference_loss(tied, abs_eps=1e-12).sum(), tied)
    assert torch.equal(g0, torch.zeros_like(g0))


def test_difference_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k >= 2"):
        difference_loss(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="difference_norm"):
        difference_loss(torch.zeros(3, 2), difference_norm="mean")
    with pytest.raises(ValueError, match="num_samples"):
        difference_loss(torch.zeros(5), num_samples=2)


def test_score_std_and_histogram_by_hand():
    scores = torch.tensor([1.0, 0.0, 3.0, -2.0, -2.0, 0.5])
    # population std of (1, 0, 3): mean 4/3, var (1/9 + 16/9 + 25/9) / 3 = 42/27
    torch.testing.assert_close(within_prompt_std(scores, 3)[0], torch.tensor(math.sqrt(42 / 27)))
    normalized, fractions = normalized_difference_histogram(torch.tensor([1.0, 2.0, 3.0, 0.0, 2.5, 2.5]), bins=5)
    torch.testing.assert_close(normalized, torch.tensor([1 / 3, 2 / 3, 1.0, 0.0, 2.5 / 3, 2.5 / 3]))
    # bins [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1]: 0 -> 0; 1/3 -> 1; 2/3 -> 3; 5/6, 5/6, 1 -> 4
    torch.testing.assert_close(fractions, torch.tensor([1, 1, 0, 1, 3]) / 6.0)


# ------------------------------------------------------------------------------------------------ hand-built batches
def _encode(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + r, len(p)


def _rows(tokenizer, items: list[tuple[str, str]]):
    seqs, plens = zip(*(_encode(tokenizer, p, r) for p, r in items))
    pad = tokenizer.pad_token_id
    ids = pad_sequences(seqs, pad)  # right padding
    mask = (pad_sequences(seqs, -1) != -1).long()
    loss_mask = mask.clone()
    for i, n in enumerate(plens):
        loss_mask[i, :n] = 0
    return ids, mask, loss_mask


def preference_batch(tokenizer, n: int = 3) -> PreferenceBatch:
    items = [(PROMPTS[i], PAIRS[i][0]) for i in range(n)] + [(PROMPTS[i], PAIRS[i][1]) for i in range(n)]
    ids, mask, loss_mask = _rows(tokenizer, items)
    return PreferenceBatch(ids, mask, loss_mask, torch.zeros(n, dtype=torch.long), index=torch.arange(n))


def sample_batch(tokenizer) -> SampleSetBatch:
    items = [(PROMPTS[b], s) for b in range(len(SAMPLES)) for s in SAMPLES[b]]
    ids, mask, loss_mask = _rows(tokenizer, items)
    return SampleSetBatch(ids, mask, loss_mask, torch.zeros(len(SAMPLES), dtype=torch.long),
                          num_samples=len(SAMPLES[0]), prompt_ids=["a", "b"])


class StepSpy:
    """Wraps an optimizer's ``step``: records the parameters and gradients it is called with."""

    def __init__(self, module: L.LightningModule) -> None:
        self.module, self.calls = module, []

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        original = optimizer.step

        def step(*args, **kwargs):
            self.calls.append({n: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                               for n, p in self.module.named_parameters() if p.requires_grad})
            return original(*args, **kwargs)

        optimizer.step = step
        return optimizer


def fit_steps(module, batches, optimizer: str = "sgd", steps: int = 1, spy: StepSpy | None = None, double=True):
    """Train ``module`` on ``batches`` (one per step) with SGD(lr) or its own AdamW, no clipping."""
    module.configure_model()
    if double:
        module.double()
    if optimizer == "sgd":
        module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=module.lr)  # type: ignore
    if spy is not None:
        build = module.configure_optimizers

        def configure():
            out = build()
            if isinstance(out, torch.optim.Optimizer):
                return spy.wrap(out)
            (opts, scheds) = out
            return [spy.wrap(opts[0])], scheds

        module.configure_optimizers = configure  # type: ignore
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda x: x)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ independent reference
def ref_scores(model, params, ids, mask):
    """HF's own pooling: the logit at the last non-pad token (rows are right padded)."""
    return functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask}).logits[:, 0]


def ref_J(model, params, samples: SampleSetBatch, norm: float):
    r = ref_scores(model, params, samples.input_ids, samples.attention_mask)
    k, B = samples.num_samples, samples.num_prompts
    total = 0.0
    for b in range(B):
        for i in range(k):
            for j in range(i + 1, k):
                total = total + norm * torch.sigmoid((r[b * k + i] - r[b * k + j]).abs())
    return total / B


def ref_L(model, params, prefs: PreferenceBatch):
    r = ref_scores(model, params, prefs.input_ids, prefs.attention_mask)
    B = prefs.num_pairs
    return sum(-torch.log(torch.sigmoid(r[i] - r[B + i])) for i in range(B)) / B


def ref_setup(module):
    model = copy.deepcopy(module.reward_model.hf_model).double().eval()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, theta


def meta_params(model, theta, samples, eta, norm, create_graph=False):
    names = list(theta)
    J = ref_J(model, theta, samples, norm)
    grads = torch.autograd.grad(J, [theta[n] for n in names], create_graph=create_graph, allow_unused=True)
    return {n: theta[n] + eta * (g if g is not None else torch.zeros_like(theta[n])) for n, g in zip(names, grads)}


PREFIX = "reward_model.hf_model."


@pytest.fixture(scope="module")
def tok():
    return RewardModelModule(export_dir=None).tokenizer


@pytest.fixture()
def float64_norms(monkeypatch):
    """Llama's RMSNorm computes in float32 whatever the parameter dtype (~1e-7 relative noise, which swamps finite
    differences): compute it in the input's dtype, so that a float64 model is float64 throughout."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def test_first_order_update_equals_minus_alpha_grad_at_shifted_params(tok, float64_norms):
    alpha, eta = 0.5, 2.0
    torch.manual_seed(0)
    module = MetaRewardModelModule(lr=alpha, meta_lr=eta, max_grad_norm=None, export_dir=None)
    module.configure_model()
    prefs, samples = preference_batch(tok), sample_batch(tok)
    model, theta = ref_setup(module.double())
    for t in theta.values():
        t.requires_grad_(True)
    shifted = {n: t.detach().requires_grad_(True) for n, t in meta_params(model, theta, samples, eta, 2 / 9).items()}
    L_shift = ref_L(model, shifted, prefs)
    g_shift = dict(zip(shifted, torch.autograd.grad(L_shift, list(shifted.values()), allow_unused=True)))
    g_plain = dict(zip(theta, torch.autograd.grad(ref_L(model, theta, prefs), list(theta.values()), allow_unused=True)))

    fit_steps(module, [{"preferences": prefs, "samples": samples}])
    after = _params(module)
    moved = 0
    for n, t in theta.items():
        g = g_shift[n] if g_shift[n] is not None else torch.zeros_like(t)
        want = t.detach() - alpha * g
        torch.testing.assert_close(after[PREFIX + n], want, atol=1e-8, rtol=0, msg=lambda m: f"{n}: {m}")
        if g_plain[n] is not None and (g - g_plain[n]).abs().max() > 1e-6:
            moved += 1  # the meta step changed this parameter's update: the check above tells the two apart
    assert moved > 10 and module.meta_steps == 1


def test_second_order_gradient_matches_central_finite_differences(tok, float64_norms):
    alpha, eta = 0.5, 2.0
    torch.manual_seed(0)
    module = MetaRewardModelModule(lr=alpha, meta_lr=eta, meta_order="second", max_grad_norm=None, export_dir=None)
    module.configure_model()
    prefs, samples = preference_batch(tok), sample_batch(tok)
    model, theta = ref_setup(module.double())
    spy = StepSpy(module)
    fit_steps(module, [{"preferences": prefs, "samples": samples}], spy=spy)
    grad = {n[len(PREFIX):]: g for n, (_, g) in spy.calls[0].items()}

    def F(params):  # L(theta + eta * grad J(theta))
        with torch.enable_grad():
            p = {n: t.detach().requires_grad_(True) for n, t in params.items()}
            return float(ref_L(model, meta_params(model, p, samples, eta, 2 / 9), prefs))

    gen = torch.Generator().manual_seed(1)
    directions = [{n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in theta.items()}
                  for _ in range(2)]
    directions.append({n: grad[n].clone() for n in theta})  # along the gradient itself
    h = 1e-5
    for v in directions:
        norm = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
        v = {n: x / norm for n, x in v.items()}
        fd = (F({n: theta[n] + h * v[n] for n in theta}) - F({n: theta[n] - h * v[n] for n in theta})) / (2 * h)
        analytic = sum(float((grad[n] * v[n]).sum()) for n in theta)
        assert abs(analytic - fd) <= 1e-3 * abs(fd), (analytic, fd)
    # discriminating: the first-order gradient misses the Hessian term by far more than the tolerance
    plain = {n: t.detach().requires_grad_(True) for n, t in meta_params(
        model, {n: t.clone().requires_grad_(True) for n, t in theta.items()}, samples, eta, 2 / 9).items()}
    g1 = torch.autograd.grad(ref_L(model, plain, prefs), list(plain.values()), allow_unused=True)
    v = directions[-1]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
    first_dir = sum(float((g * v[n]).sum()) for n, g in zip(plain, g1) if g is not None) / norm
    second_dir = sum(float((grad[n] * v[n]).sum()) for n in theta) / norm
    assert abs(first_dir - second_dir) > 1e-2 * abs(second_dir), (first_dir, second_dir)


@pytest.mark.parametrize("meta_order", ["first", "second"])
def test_parameters_are_restored_exactly_before_the_optimizer_step(tok, meta_order):
    torch.manual_seed(0)
    module = MetaRewardModelModule(lr=1e-3, meta_lr=1.0, meta_order=meta_order, export_dir=None)
    prefs, samples = preference_batch(tok), sample_batch(tok)
    spy = StepSpy(module)
    module.configure_model()
    before = _params(module)
    fit_steps(module, [{"preferences": prefs, "samples": samples}], optimizer="adamw", spy=spy, double=False)
    seen = spy.calls[0]
    for n, p in before.items():
        assert torch.equal(seen[n][0], p), n  # bit for bit
    # the gradient was taken at theta', not theta: it differs from the vanilla reward model's gradient
    torch.manual_seed(0)
    vanilla = MetaRewardModelModule(lr=1e-3, meta_lr=1.0, export_dir=None)
    vanilla.meta_step_enabled = False
    vspy = StepSpy(vanilla)
    fit_steps(vanilla, [{"preferences": prefs, "samples": samples}], optimizer="adamw", spy=vspy, double=False)
    diff = max(float((seen[n][1] - vspy.calls[0][n][1]).abs().max()) for n in before if seen[n][1] is not None)
    assert diff > 1e-4


def test_meta_step_off_is_exactly_a_reward_model_step(tok):
    prefs, samples = preference_batch(tok), sample_batch(tok)
    torch.manual_seed(0)
    meta = MetaRewardModelModule(lr=1e-3, export_dir=None)
    meta.meta_step_enabled = False
    fit_steps(meta, [{"preferences": prefs, "samples": samples}] * 2, optimizer="adamw", steps=2, double=False)
    torch.manual_seed(0)
    rm = RewardModelModule(lr=1e-3, export_dir=None)
    fit_steps(rm, [prefs] * 2, optimizer="adamw", steps=2, double=False)
    a, b = _params(meta), _params(rm)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert meta.meta_steps == 0


@pytest.mark.parametrize("meta_order", ["first", "second"])
def test_micro_batches_accumulate_to_the_whole_batch_update(tok, meta_order):
    prefs, samples = preference_batch(tok), sample_batch(tok)
    results = []
    for micro in (None, 1):
        torch.manual_seed(0)
        module = MetaRewardModelModule(lr=0.5, meta_lr=2.0, meta_order=meta_order, micro_batch_size=micro,
                                       max_grad_norm=None, export_dir=None)
        fit_steps(module, [{"preferences": prefs, "samples": samples}])
        results.append(_params(module))
    for n, p in results[0].items():
        torch.testing.assert_close(results[1][n], p, atol=1e-10, rtol=0, msg=lambda m: f"{n}: {m}")


def test_meta_step_without_samples_names_the_stream(tok):
    module = MetaRewardModelModule(lr=1e-3, export_dir=None)
    with pytest.raises(ValueError, match="model.sample_stream"):
        fit_steps(module, [preference_batch(tok)], double=False)


def test_validation_metrics_on_sample_sets_by_hand(tok):
    module = MetaRewardModelModule(export_dir=None, histogram_bins=5)
    module.configure_model()
    samples = sample_batch(tok)
    with torch.no_grad():
        r = module.reward_model(samples.input_ids, samples.attention_mask).double()
        module.validation_step(samples, 0)
    metrics = module.sample_set_metrics()
    d = [abs(float(r[b * 3 + i] - r[b * 3 + j])) for b in range(2) for i in range(3) for j in range(i + 1, 3)]
    stds = [float(r[b * 3:(b + 1) * 3].std(unbiased=False)) for b in range(2)]
    assert metrics["val/samples/abs_delta_mean"] == pytest.approx(sum(d) / 6, rel=1e-5)
    assert metrics["val/samples/norm_abs_delta_mean"] == pytest.approx(sum(d) / 6 / max(d), rel=1e-5)
    assert metrics["val/samples/score_std"] == pytest.approx(sum(stds) / 2, rel=1e-5)
    hist = [metrics[f"val/samples/norm_abs_delta_hist/{b / 5:.1f}-{(b + 1) / 5:.1f}"] for b in range(5)]
    want = [0] * 5
    for x in d:
        want[min(int(x / max(d) * 5), 4)] += 1 / 6
    assert hist == pytest.approx(want)
    assert module.sample_set_metrics() == {}  # reset


def test_construction_and_strategy_refusals():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    with pytest.raises(ValueError, match="model.meta_order"):
        MetaRewardModelModule(meta_order="third", export_dir=None)
    with pytest.raises(ValueError, match="model.difference_norm"):
        MetaRewardModelModule(difference_norm="mean", export_dir=None)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        MetaRewardModelModule(meta_order="second", gradient_checkpointing=True, export_dir=None)
    module = MetaRewardModelModule(export_dir=None)
    module.check_strategy(DDPStrategy(), batch_size=4)
    with pytest.raises(ValueError, match="strategy ddp"):
        module.check_strategy(FSDPStrategy(), batch_size=4)
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # its __init__ needs the deepspeed package
    deepspeed.config = {}
    with pytest.raises(ValueError, match="DeepSpeedStrategy"):
        module.check_strategy(deepspeed, batch_size=4)
