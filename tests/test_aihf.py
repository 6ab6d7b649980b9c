"""AIHF-DPO / Self-Play AIHF (lightning_rlhf/methods/aihf_dpo.py, losses/aihf.py).

Checked against independent computations: ``w_D = 0`` gives DPOModule's loss and gradients on the same batch;
``w_P = 0`` with ``spin`` equals a SPIN loss computed by hand (one unpadded forward per sequence, log-softmax, sum over
the response); ``nll`` equals ``-mean log pi(y_E)`` by hand; mixed weights combine the two hand-computed means; the
opponent is refreshed exactly at the round starts; misconfiguration fails naming the flag.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule
from lightning_rlhf.losses.aihf import aihf_dpo_objective, aihf_reward_loss, nll_demo_loss, spin_loss
from lightning_rlhf.methods import DPOModule
from lightning_rlhf.methods.aihf_dpo import AIHFDPOModule
from tests.test_resume import REPO, StepRecorder, _assert_same_run, _assert_same_weights, _cli_subprocess, _overlay
from tests.test_resume import _read

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- pure losses
def test_spin_and_objective_by_hand():
    lp_e, lp_s = torch.tensor([-3.0, -5.0], dtype=torch.float64), torch.tensor([-4.0, -2.0], dtype=torch.float64)
    op_e, op_s = torch.tensor([-3.5, -4.0], dtype=torch.float64), torch.tensor([-3.0, -2.5], dtype=torch.float64)
    out = spin_loss(lp_e, lp_s, op_e, op_s, beta=0.5)
    # row 0: 0.5 * ((-3 + 3.5) - (-4 + 3)) = 0.75; row 1: 0.5 * ((-5 + 4) - (-2 + 2.5)) = -0.75
    expected = torch.tensor([math.log1p(math.exp(-0.75)), math.log1p(math.exp(0.75))], dtype=torch.float64)
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(nll_demo_loss(lp_e), torch.tensor([3.0, 5.0], dtype=torch.float64))
    pref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # B = 3 pairs, N = 2 demonstrations
    obj = aihf_dpo_objective(pref, expected, w_P=0.5, w_D=2.0)
    torch.testing.assert_close(obj.total, 0.5 * 2.0 + 2.0 * expected.mean())  # each term over its own pairs
    assert aihf_dpo_objective(pref, expected, w_P=1.0, w_D=0.0).total.item() == 2.0


def test_reward_step_terms_by_hand():
    r_e, r_s = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
    r_w, r_l = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    l_d = [sp(1.0), sp(-0.5)]  # N = 2 demonstration pairs
    l_p = [sp(1.0), sp(-1.0), sp(0.0)]  # B = 3 preference pairs
    out = aihf_reward_loss(r_e, r_s, r_w, r_l, w_D=0.5, w_P=2.0)  # per_term: each averaged over its own pairs
    assert out.demonstration.item() == pytest.approx(sum(l_d) / 2)
    assert out.preference.item() == pytest.approx(sum(l_p) / 3)
    assert out.total.item() == pytest.approx(0.5 * sum(l_d) / 2 + 2.0 * sum(l_p) / 3)
    pooled = aihf_reward_loss(r_e, r_s, r_w, r_l, w_D=0.5, w_P=2.0, term_norm="pooled")
    assert pooled.total.item() == pytest.approx((0.5 * sum(l_d) + 2.0 * sum(l_p)) / 5)
    linear = aihf_reward_loss(r_e, r_s, r_w, r_l, w_D=1.0, w_P=0.0, demo_term="linear", beta=0.25)
    assert linear.total.item() == pytest.approx(-((1.0 - 0.0) + (0.0 - 0.5)) / 2 / 0.25)
    # w_D = 0: plain Bradley-Terry reward-model training, with its gradients
    scores = r_w.clone().requires_grad_(True)
    bt = aihf_reward_loss(r_e, r_s, scores, r_l, w_D=0.0, w_P=1.0)
    bt.total.backward()
    assert bt.total.item() == pytest.approx(sum(l_p) / 3)
    expected_grad = [-(1 - 1 / (1 + math.exp(-m))) / 3 for m in (1.0, -1.0, 0.0)]  # d/dm -log sigmoid(m) / B
    torch.testing.assert_close(scores.grad, torch.tensor(expected_grad, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- module steps
_BATCHES: dict = {}


def _data(module, n=4):
    """4 preference pairs and 4 demonstrations of the embedded HH data (tokenised once per test session)."""
    if not _BATCHES:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="aihf_batches_"))
        _small_files(root)  # small files: tokenising the embedded ones would take most of these tests' time
        for name, cls in (("preferences", PreferenceDataModule), ("demonstrations", DemonstrationDataModule)):
            path = str(root / f"{name}.jsonl")
            dm = cls(train_path=path, val_path=path, max_train_rows=4, batch_size=4, max_length=96,
                     max_prompt_length=64, skip_invalid_rows=True, seed=3)
            dm.set_tokenizer(module.tokenizer)
            dm.setup("fit")
            _BATCHES[name] = dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])
    return {name: b.slice(0, n) for name, b in _BATCHES.items()}


def _step(module, batch):
    """One training step with the trainer-facing parts replaced: backward is plain autograd, the optimizer update
    records the loss and the gradients instead of stepping. Returns (loss, {name: grad})."""
    seen = {}

    def update(loss=None, watch=None, role=None):
        seen["loss"] = loss.detach().clone()
        seen["grads"] = {n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None}
        return torch.zeros(())

    module.manual_backward = lambda loss: loss.backward()
    module.optimizer_update = update
    module.is_logging_step = lambda: False
    module.training_step(batch, 0)
    return seen["loss"], seen["grads"]


def _module(cls=AIHFDPOModule, **kw):
    torch.manual_seed(0)
    kw.setdefault("max_new_tokens", 8) if cls is AIHFDPOModule else None
    module = cls(export_dir=None, micro_batch_size=2, **kw)
    module.configure_model()
    return module


def test_w_D_zero_is_dpo_loss_and_gradients_exactly():
    dpo = _module(DPOModule, beta=0.2)
    aihf = _module(w_D=0.0, beta=0.2)
    batch = _data(dpo)
    loss_dpo, g_dpo = _step(dpo, batch["preferences"])
    for b in (batch, batch["preferences"]):  # the dict of streams or a plain preference batch
        aihf.policy.zero_grad(set_to_none=True)
        loss, grads = _step(aihf, b)
        assert torch.equal(loss, loss_dpo)
        assert grads.keys() == g_dpo.keys() and all(torch.equal(grads[n], g_dpo[n]) for n in g_dpo)
    assert not hasattr(aihf, "opponent")  # no demonstration term: no snapshot


def _hand_logp(model, ids, attn, loss_mask):
    """Summed response log-prob of one row: its real tokens only (no padding), one forward pass."""
    keep = attn.bool()
    ids, loss_mask = ids[keep][None], loss_mask[keep]
    logits = model(input_ids=ids).logits[0, :-1].double()
    logp = F.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return (logp * loss_mask[1:].double()).sum()


def _perturbed_opponent(module):
    """Make the opponent differ from the policy (as it does mid-round) and skip the refresh of step 0."""
    module.iteration = 1
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in module.opponent.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_w_P_zero_spin_is_a_hand_computed_spin_loss_with_its_gradients():
    module = _module(w_P=0.0, w_D=1.0, demo_term="spin", beta=0.3, round_steps=4)
    batch = _data(module)
    _perturbed_opponent(module)
    loss, grads = _step(module, batch)
    pairs = module.last_demo_pairs  # the y_E rows, then the opponent's samples y~ on the same prompts
    N = len(batch["demonstrations"])
    assert pairs.num_pairs == N
    # the samples were drawn from the opponent on the demonstrations' prompts
    demos = batch["demonstrations"]
    for i in range(N):
        prompt = demos.prompt_input_ids[i][demos.prompt_attention_mask[i].bool()]
        row = pairs.input_ids[N + i][pairs.attention_mask[N + i].bool()]
        assert torch.equal(row[: len(prompt)], prompt) and pairs.loss_mask[N + i].sum() > 0
    module.policy.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(N):
        args = lambda r: (pairs.input_ids[r], pairs.attention_mask[r], pairs.loss_mask[r])  # noqa: E731
        with torch.no_grad():
            o_e, o_s = _hand_logp(module.opponent.model, *args(i)), _hand_logp(module.opponent.model, *args(N + i))
        p_e, p_s = _hand_logp(module.policy, *args(i)), _hand_logp(module.policy, *args(N + i))
        total = total - F.logsigmoid(0.3 * ((p_e - o_e) - (p_s - o_s))) / N
    total.backward()
    torch.testing.assert_close(loss.double(), total.detach(), rtol=1e-5, atol=1e-6)
    for n, p in module.policy.named_parameters():
        torch.testing.assert_close(grads[n].double(), p.grad.double(), rtol=1e-3, atol=1e-6)


def test_nll_term_and_mixed_weights_by_hand():
    module = _module(w_P=0.5, w_D=2.0, demo_term="nll", beta=0.2)
    batch = _data(module)
    loss, _ = _step(module, batch)
    demos, prefs = batch["demonstrations"], batch["preferences"]
    with torch.no_grad():
        nll = -sum(_hand_logp(module.policy, demos.input_ids[i], demos.attention_mask[i], demos.loss_mask[i])
                   for i in range(len(demos))) / len(demos)
        B = prefs.num_pairs
        h = []
        for i in range(B):
            rows = [(prefs.input_ids[r], prefs.attention_mask[r], prefs.loss_mask[r]) for r in (i, B + i)]
            pw, pl = (_hand_logp(module.policy, *r) for r in rows)
            rw, rl = (_hand_logp(module.reference, *r) for r in rows)
            h.append(0.2 * ((pw - rw) - (pl - rl)))
        dpo = -F.logsigmoid(torch.stack(h)).mean()
    torch.testing.assert_close(loss.double(), 0.5 * dpo + 2.0 * nll, rtol=1e-5, atol=1e-5)
    assert not hasattr(module, "opponent")  # nll needs no opponent


def test_opponent_is_refreshed_exactly_at_round_starts():
    module = _module(w_P=1.0, w_D=1.0, demo_term="spin", round_steps=2, lr=1e-2)
    batch = _data(module, n=2)
    opt = torch.optim.SGD(module.policy.parameters(), lr=0.5)
    taken, same_as_policy = [], []

    def update(loss=None, watch=None, role=None):
        opt.step()
        opt.zero_grad()
        return torch.zeros(())

    module.manual_backward = lambda loss: loss.backward()
    module.optimizer_update = update
    module.is_logging_step = lambda: False
    for _ in range(5):
        before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
        module.training_step(batch, 0)
        taken.append(int(module.opponent.taken_at))
        same_as_policy.append(all(torch.equal(module.opponent.model.state_dict()[n], v) for n, v in before.items()))
    assert taken == [0, 0, 2, 2, 4]
    assert same_as_policy == [True, False, True, False, True]  # the opponent = the policy at the round's start
    assert not any(p.requires_grad for p in module.opponent.parameters())


def test_misconfiguration_names_the_flag():
    with pytest.raises(ValueError, match="model.demo_term"):
        AIHFDPOModule(demo_term="bt")
    with pytest.raises(ValueError, match="model.w_P and model.w_D"):
        AIHFDPOModule(w_P=0.0, w_D=0.0)
    with pytest.raises(ValueError, match="model.round_steps"):
        AIHFDPOModule(round_steps=0)
    with pytest.raises(ValueError, match="model.precompute_ref_logprobs"):
        AIHFDPOModule(precompute_ref_logprobs=True)
    module = _module(w_D=1.0)
    with pytest.raises(ValueError, match="model.w_D=1.0 needs a demonstration stream"):
        module.split_batch(_data(module, n=2)["preferences"])
    # at start (setup): a preference data module alone has no demonstration stream
    with pytest.raises(ValueError, match="model.w_D=1.0 needs a demonstration stream named 'demonstrations'.*"
                                         "PreferenceDataModule"):
        module.check_streams(PreferenceDataModule())
    AIHFDPOModule(w_D=0.0).check_streams(PreferenceDataModule())  # plain DPO: fine


# ---------------------------------------------------------------------------------------------- CLI: configs, resume
def _small_files(root: Path, prompts: bool = False) -> list[str]:
    """40 short preference pairs and 40 demonstrations (and prompts) of the embedded HH data as small files
    (tokenising the whole embedded files would dominate these tests), and a config overlay whose streams read them."""
    import gzip

    import yaml

    streams = {}
    kinds = [("prompts", "PromptDataModule")] if prompts else []
    kinds += [("preferences", "PreferenceDataModule"), ("demonstrations", "DemonstrationDataModule")]
    for kind, cls in kinds:
        rows = []
        with gzip.open(REPO / "lightning_rlhf" / "assets" / "data" / f"hh_{kind}_train.jsonl.gz", "rt") as f:
            for line in f:
                if len(json.loads(line)["prompt"]) < 200:
                    rows.append(line)
                if len(rows) == 40:
                    break
        path = root / f"{kind}.jsonl"
        path.write_text("".join(rows))
        args = {"train_path": str(path), "val_path": str(path), "max_val_rows": 8, "batch_size": 4,
                "max_prompt_length": 96, "seed": len(streams)}
        if kind != "prompts":
            args["max_length"] = 128
        streams[kind] = {"class_path": f"lightning_rlhf.data.{cls}", "init_args": args}
    primary = "prompts" if prompts else "preferences"
    overlay = root / "streams.yaml"
    data = {"class_path": "lightning_rlhf.data.MultiStreamDataModule",
            "init_args": {"primary": primary, "val_stream": primary, "streams": streams}}
    overlay.write_text(yaml.safe_dump({"data": data}))
    return ["-c", str(overlay)]


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny_nll.yaml"])
def test_tiny_configs_train_end_to_end(config, in_tmp):
    from lightning_rlhf.cli import main

    cli = main(["fit", "-c", str(REPO / "configs" / "aihf" / config), *_small_files(in_tmp), "--trainer.max_steps=5",
                "--trainer.val_check_interval=5", "--model.max_new_tokens=8"])
    metrics = cli.trainer.callback_metrics
    assert cli.model.iteration == 5 and (Path(cli.trainer.log_dir) / "export" / "model.safetensors").exists()
    assert all(math.isfinite(float(metrics[k])) for k in ("train/loss", "train/preference_loss", "train/demo_loss",
                                                           "val/accuracy"))
    if config == "tiny.yaml":  # round_steps 4: the opponent was last refreshed before step 4
        assert int(cli.model.opponent.taken_at) == 4 and float(metrics["train/sample_length"]) > 0


class AIHFStepRecorder(StepRecorder):
    """:class:`tests.test_resume.StepRecorder` for AIHF's dict batches: the preference rows (dataset indices) and
    the demonstration rows (token sums)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch["preferences"], batch_idx)
        records = _read(Path(self.path))
        records[-1]["rows"] = [records[-1]["rows"], batch["demonstrations"].input_ids.sum(1).tolist()]
        Path(self.path).write_text("".join(json.dumps(r) + "\n" for r in records))


AIHF_RECORD = {
    "metrics": ["train/loss", "train/preference_loss", "train/demo_loss", "train/opponent_taken_at",
                "train/sample_length", "train/lr"],
    "attributes": ["iteration"],
}


def _aihf_overlay(tmp: Path, name: str, steps: int, signal_at: int = -1) -> list[str]:
    args = _overlay(tmp, name, steps, signal_at=signal_at, recorder=AIHF_RECORD)
    cfg = Path(args[1])
    cfg.write_text(cfg.read_text().replace("tests.test_resume.StepRecorder", "tests.test_aihf.AIHFStepRecorder"))
    return args


def test_sigkill_mid_round_then_resume_matches_the_uninterrupted_run(in_tmp):
    """Rounds of 3 steps; killed after step 5 (the opponent was taken before step 3, the policy has moved on since):
    the resumed run continues with the checkpointed opponent and matches the uninterrupted run step by step."""
    from lightning_rlhf.cli import main

    base = ["fit", "-c", str(REPO / "configs" / "aihf" / "tiny.yaml"), *_small_files(in_tmp), "--model.round_steps=3",
            "--model.max_new_tokens=8", "--model.lr_schedule=cosine", "--model.warmup_steps=2"]
    main([*base, *_aihf_overlay(in_tmp, "ref", 8)])
    proc = _cli_subprocess([*base, *_aihf_overlay(in_tmp, "run", 8, signal_at=5)], in_tmp)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(in_tmp / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert int(state["opponent.taken_at"]) == 3
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[f"opponent.model.{w}"], state[f"policy.{w}"])  # mid-round: not rebuildable

    cli = main([*base, *_aihf_overlay(in_tmp, "run", 8), "--ckpt_path=last"])
    assert cli.model.iteration == 8 and int(cli.model.opponent.taken_at) == 6
    records, reference = _read(in_tmp / "run.jsonl"), _read(in_tmp / "ref.jsonl")
    assert [r["metrics"][3] for r in reference] == [0, 0, 0, 3, 3, 3, 6, 6]  # refreshed on schedule
    _assert_same_run(records, reference)
    _assert_same_weights(in_tmp / "run_export", in_tmp / "ref_export")
    final = torch.load(in_tmp / "ref_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    for key, value in final.items():
        if key.startswith("opponent."):
            assert torch.equal(cli.model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------- AIHFModule (explicit)
def _rlhf_module(**kw):
    from lightning_rlhf.methods import AIHFModule

    torch.manual_seed(0)
    module = AIHFModule(export_dir=None, reward_model_name_or_path="builtin:tiny-llama", micro_batch_size=2,
                        max_new_tokens=8, **kw)
    module.configure_model()
    return module


def _reward_step(module, prefs, demos):
    """The reward phase with the optimizer update replaced by a recorder of the loss and the reward model's grads."""
    seen = {}

    def update(loss=None, watch=None, role=None):
        assert role == "reward"
        seen["loss"] = loss.detach().clone()
        seen["grads"] = {n: p.grad.detach().clone() for n, p in module.reward_model.named_parameters()
                         if p.grad is not None}
        return torch.zeros(())

    module.manual_backward = lambda loss: loss.backward()
    module.optimizer_update = update
    module.current_lr = lambda role=None: 0.0
    module.reward_step(prefs, demos)
    return seen["loss"], seen["grads"]


def _hand_score(model, ids, attn):
    """A reward model's score of one row, on its real tokens only (no padding)."""
    keep = attn.bool()
    return model(ids[keep][None], torch.ones(1, int(keep.sum()), dtype=torch.long))[0].double()


def test_rlhf_reward_step_with_w_D_zero_is_plain_bradley_terry():
    module = _rlhf_module(w_D=0.0, w_P=1.0)
    prefs = _data(module)["preferences"]
    loss, grads = _reward_step(module, prefs, None)
    module.reward_model.zero_grad(set_to_none=True)
    B = prefs.num_pairs
    hand = sum(-F.logsigmoid(_hand_score(module.reward_model, prefs.input_ids[i], prefs.attention_mask[i])
                             - _hand_score(module.reward_model, prefs.input_ids[B + i], prefs.attention_mask[B + i]))
               for i in range(B)) / B
    hand.backward()
    torch.testing.assert_close(loss.double(), hand.detach(), rtol=1e-5, atol=1e-6)
    for n, p in module.reward_model.named_parameters():
        torch.testing.assert_close(grads[n].double(), p.grad.double(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("term_norm,demo_term", [("per_term", "bt"), ("pooled", "bt"), ("per_term", "linear")])
def test_rlhf_reward_step_terms_by_hand(term_norm, demo_term):
    module = _rlhf_module(w_D=0.5, w_P=2.0, term_norm=term_norm, demo_term=demo_term, kl_coef=0.25)
    batch = _data(module)
    prefs, demos = batch["preferences"], batch["demonstrations"].slice(0, 3)  # N = 3 demonstrations, B = 4 pairs
    module.reward_count.fill_(16.0)
    module.reward_mean.fill_(2.0)
    loss, _ = _reward_step(module, prefs, demos)
    pairs, N, B = module.last_demo_pairs, 3, prefs.num_pairs
    with torch.no_grad():
        score = lambda b, r: _hand_score(module.reward_model, b.input_ids[r], b.attention_mask[r])  # noqa: E731
        margins_d = [score(pairs, i) - score(pairs, N + i) for i in range(N)]
        l_d = [(-m / 0.25) if demo_term == "linear" else -F.logsigmoid(m) for m in margins_d]
        l_p = [-F.logsigmoid(score(prefs, i) - score(prefs, B + i)) for i in range(B)]
    if term_norm == "per_term":
        expected = 0.5 * sum(l_d) / N + 2.0 * sum(l_p) / B
    else:
        expected = (0.5 * sum(l_d) + 2.0 * sum(l_p)) / (N + B)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    # the reward changed: PPO's running score moments restart
    assert float(module.reward_count) == 0 and float(module.reward_mean) == 0 and float(module.reward_var) == 1


def test_rlhf_misconfiguration_names_the_flag():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from lightning_rlhf.data.streams import MultiStreamDataModule
    from lightning_rlhf.methods import AIHFModule

    with pytest.raises(ValueError, match="model.reward_model_name_or_path"):
        AIHFModule(reward_fn={"class_path": "lightning_rlhf.rewards.TokenCountReward"})
    with pytest.raises(ValueError, match="model.term_norm"):
        AIHFModule(reward_model_name_or_path="builtin:tiny-llama", term_norm="mixed")
    module = AIHFModule(reward_model_name_or_path="builtin:tiny-llama", on_nonfinite="stop", export_dir=None)
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    deepspeed.config = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match=r"\(policy, reward\).*one optimizer only; use trainer.strategy: ddp"):
        module.check_strategy(deepspeed, batch_size=8)
    with pytest.raises(ValueError, match="find_unused_parameters: true"):
        module.check_strategy(DDPStrategy(), batch_size=8)
    module.check_strategy(DDPStrategy(find_unused_parameters=True), batch_size=8)
    assert module.required_streams == ("prompts", "preferences", "demonstrations")
    two = MultiStreamDataModule(streams={"prompts": {"class_path": "lightning_rlhf.data.PromptDataModule"},
                                         "preferences": {"class_path": "lightning_rlhf.data.PreferenceDataModule"}})
    with pytest.raises(ValueError, match="demonstrations"):
        two.check_required_streams(module)


def test_rlhf_tiny_config_trains_end_to_end_and_exports_both_models(in_tmp):
    from safetensors.torch import load_file

    from lightning_rlhf.cli import main

    cli = main(["fit", "-c", str(REPO / "configs" / "aihf" / "tiny_rlhf.yaml"), *_small_files(in_tmp, prompts=True),
                "--model.max_iterations=3", "--model.max_new_tokens=8", "--model.mini_batch_size=4",
                "--model.micro_batch_size=4"])
    model = cli.model
    assert model.iteration == 3 and model.reward_steps_done == 3
    metrics = cli.trainer.callback_metrics
    for key in ("reward/loss", "reward/demo_term", "reward/preference_term", "score/mean", "policy/loss"):
        assert math.isfinite(float(metrics[key])), key
    export = Path(cli.trainer.log_dir) / "export"
    assert (export / "model.safetensors").exists()
    rm = load_file(str(export / "reward_model" / "model.safetensors"))
    trained = {k: v for k, v in model.reward_model.hf_model.state_dict().items()}
    assert rm.keys() == trained.keys() and all(torch.equal(rm[k], trained[k]) for k in rm)
    fresh = _rlhf_module().reward_model.hf_model.state_dict()
    assert any(not torch.equal(rm[k], fresh[k]) for k in rm)  # the reward model was trained
    opt_policy, opt_reward = cli.model.optimizers()
    reward_ids = {id(p) for p in model.reward_model.parameters()}
    assert {id(p) for g in opt_reward.optimizer.param_groups for p in g["params"]} == reward_ids
    assert not reward_ids & {id(p) for g in opt_policy.optimizer.param_groups for p in g["params"]}


RLHF_RECORD = {
    "metrics": ["score/mean", "policy/loss", "value/loss", "reward/loss", "reward/demo_term", "reward/preference_term",
                "reward/lr"],
    "attributes": ["iteration", "reward_steps_done", "reward_mean", "reward_var", "reward_count"],
}


@pytest.mark.slow
def test_rlhf_sigkill_then_resume_matches_the_uninterrupted_run(in_tmp):
    """4 iterations, killed after iteration 2: the trained reward model, both optimizers and the restarted moments
    come back from the checkpoint, and the resumed run matches the uninterrupted one step by step (about 70 s)."""
    from lightning_rlhf.cli import main

    base = ["fit", "-c", str(REPO / "configs" / "aihf" / "tiny_rlhf.yaml"), *_small_files(in_tmp, prompts=True),
            "--model.max_iterations=4", "--model.max_new_tokens=8", "--model.mini_batch_size=4",
            "--model.micro_batch_size=4"]

    def overlay(name, signal_at=-1):
        args = _overlay(in_tmp, name, -1, signal_at=signal_at, recorder=RLHF_RECORD)
        cfg = Path(args[1])
        cfg.write_text(cfg.read_text().replace("tests.test_resume.StepRecorder", "tests.test_aihf.AIHFStepRecorder"))
        return [*args, "--trainer.max_steps=-1"]

    main([*base, *overlay("ref")])
    proc = _cli_subprocess([*base, *overlay("run", signal_at=2)], in_tmp)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(in_tmp / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["iteration"] == 2 and state["reward_steps_done"] == 2 and len(state["optimizer_states"]) == 2
    assert any(k.startswith("reward_model.") for k in state["state_dict"])  # trained: saved, not rebuilt

    cli = main([*base, *overlay("run"), "--ckpt_path=last"])
    assert cli.model.iteration == 4
    _assert_same_run(_read(in_tmp / "run.jsonl"), _read(in_tmp / "ref.jsonl"))
    _assert_same_weights(in_tmp / "run_export", in_tmp / "ref_export")
    _assert_same_weights(in_tmp / "run_export" / "reward_model", in_tmp / "ref_export" / "reward_model")
