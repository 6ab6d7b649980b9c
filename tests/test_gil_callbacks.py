"""GroupInference and AdaptiveExploration on a small stand-in LightningModule that implements the protocols (they are
reusable outside lightning_rlhf), on synthetic rollouts with planted groups."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.adaptive_exploration import AdaptiveExploration
from callbacks.adaptive_kl import AdaptiveKLController
from callbacks.group_inference import GroupInference, adjusted_rand_index
from callbacks.protocols import KL_SCALE, ExperienceAnnotatable, KLControlled

N, H = 48, 8


def planted_view(iteration: int, seed: int = 0, n: int = N) -> dict[str, torch.Tensor]:
    """Rollouts of two planted groups: features carry the group (a shifted mean in every dimension, plus noise);
    group 1 has the higher returns. ``domain_ids`` = the planted group."""
    g = torch.Generator().manual_seed(seed * 10_007 + iteration)
    group = torch.randint(0, 2, (n,), generator=g)
    features = torch.randn(n, H, generator=g) + 1.5 * (2 * group[:, None].float() - 1)
    scores = torch.where(group == 1, 1.0, -1.0) + 0.5 * torch.randn(n, generator=g)
    kl = torch.rand(n, generator=g)
    return {
        "iteration": torch.tensor(iteration), "scores": scores, "shaped_scores": scores, "kl": kl,
        "returns": scores - 0.1 * kl, "lengths": torch.randint(1, 9, (n,), generator=g),
        "domain_ids": group, "features": features,
    }


class StandIn(L.LightningModule):
    """Not a GIL (or PPO) module: a toy that implements ExperienceAnnotatable and KLControlled. Each training step
    makes a synthetic rollout, runs the registered hooks in order and composes ``kl_scale`` with ``kl_coef``."""

    def __init__(self, kl_coef: float = 0.1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.kl_coef = kl_coef
        self.iteration = 0
        self.hooks: dict[str, tuple] = {}
        self._view: dict[str, torch.Tensor] = {}
        self.records: list[dict] = []

    # ExperienceAnnotatable
    def rollout_view(self):
        return self._view

    def register_experience_hook(self, name, hook, needs_features=False):
        self.hooks[name] = (hook, needs_features)

    # KLControlled
    def last_rollout_stats(self):
        if not self._view:
            return {}
        return {"kl_seq_sum": float(self._view["kl"].mean()), "kl_token_mean": float(self._view["kl"].mean()) / 4,
                "num_sequences": float(N), "iteration": float(self._view["iteration"])}

    def training_step(self, batch, batch_idx):
        view = planted_view(self.iteration)
        scale = torch.ones(N)
        for hook, _ in self.hooks.values():
            annotations = hook(view)
            view = {**view, **annotations}
            if KL_SCALE in annotations:
                scale = scale * annotations[KL_SCALE]
        view["kl_coef"] = self.kl_coef * scale
        self._view = view
        self.records.append({"kl_coef": self.kl_coef, "view": view})
        self.iteration += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.zeros(12, 1), batch_size=1)


def _fit(module, callbacks):
    # manual optimization without optimizer steps: global_step stays 0, so one epoch of the 12 dummy batches
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module)
    return trainer


def test_stand_in_implements_the_protocols():
    module = StandIn()
    assert isinstance(module, ExperienceAnnotatable) and isinstance(module, KLControlled)


def test_group_inference_recovers_planted_groups():
    gi = GroupInference(num_groups=2, lr=5e-2, group_steps=2, seed=0)
    aris = []
    for it in range(30):
        view = planted_view(it)
        out = gi.annotate(view)
        q = out["group_posterior"]
        assert q.shape == (N, 2) and torch.allclose(q.sum(-1), torch.ones(N))
        aris.append(adjusted_rand_index(q.argmax(-1), view["domain_ids"]))
    assert min(aris[-10:]) > 0.9, aris
    # g_high names the planted high-return group (group 1): its rows carry the larger q(g_high)
    view = planted_view(100)
    out = gi.annotate(view)
    q_high = out["group_posterior"][:, int(out["group_high"][0])]
    assert float(q_high[view["domain_ids"] == 1].mean()) > 0.9 > 0.1 > float(q_high[view["domain_ids"] == 0].mean())


class StandInHost:
    """Not a GIL module: a toy critic that hosts the group head (callbacks.protocols.GroupHeadHost). Its "critic"
    step minimises ``loss_weight * loss_fn(returns, softmax(head(features)))`` with its own Adam optimizer."""

    def __init__(self, feature_dim: int = H) -> None:
        self.group_head = None
        self.feature_dim = feature_dim
        self.installed: tuple = ()

    def install_group_head(self, build_head, loss_fn, loss_weight, lr=None):
        self.group_head = build_head(self.feature_dim)
        self.loss_fn, self.loss_weight = loss_fn, loss_weight
        self.optimizer = torch.optim.Adam(self.group_head.parameters(), lr=lr)
        self.installed = (loss_weight, lr)

    # ExperienceAnnotatable (the callback registers its hook)
    def rollout_view(self):
        return {}

    def register_experience_hook(self, name, hook, needs_features=False):
        self.hook = (hook, needs_features)

    def critic_step(self, view) -> None:
        self.optimizer.zero_grad()
        q = torch.softmax(self.group_head(view["features"]), -1)
        (self.loss_weight * self.loss_fn(view["returns"], q)).backward()
        self.optimizer.step()


def test_critic_placement_recovers_planted_groups_with_a_stand_in_host():
    """placement: critic: the host builds the (seeded) head, trains it with its own optimizer on the callback's loss;
    the callback annotates the hosted head's posterior. Planted groups are recovered (ARI > 0.9)."""
    host = StandInHost()
    gi = GroupInference(placement="critic", lr=5e-2, critic_loss_weight=0.5, seed=0, entropy_coef=0.01)
    gi.setup(None, host, "fit")
    assert host.installed == (0.5, 5e-2) and host.hook[1] is True
    # the hosted head is the callback's seeded head; the callback keeps no head of its own
    torch.testing.assert_close(host.group_head[0].weight, gi.new_head(H)[0].weight, atol=0, rtol=0)
    assert gi.head is None
    aris = []
    for it in range(40):
        view = planted_view(it)
        out = gi.annotate(view)
        with torch.no_grad():
            want = torch.softmax(host.group_head(view["features"]), -1)
        torch.testing.assert_close(out["group_posterior"], want)  # the hosted head's posterior, no steps of its own
        aris.append(adjusted_rand_index(out["group_posterior"].argmax(-1), view["domain_ids"]))
        host.critic_step(view)
    assert min(aris[-10:]) > 0.9, aris
    view = planted_view(100)
    out = gi.annotate(view)
    q_high = out["group_posterior"][:, int(out["group_high"][0])]
    assert float(q_high[view["domain_ids"] == 1].mean()) > 0.9 > 0.1 > float(q_high[view["domain_ids"] == 0].mean())
    assert "head" not in gi.state_dict()  # the host's state carries the head


def test_group_inference_needs_features_and_critic_placement_needs_a_host():
    with pytest.raises(TypeError, match="GroupHeadHost"):
        GroupInference(placement="critic").setup(None, StandIn(), "fit")
    with pytest.raises(ValueError, match="placement"):
        GroupInference(placement="head")
    view = planted_view(0)
    del view["features"]
    with pytest.raises(KeyError, match="features"):
        GroupInference().annotate(view)


def test_callbacks_refuse_a_module_without_the_protocol():
    class Plain(L.LightningModule):
        pass

    for cb in (GroupInference(), AdaptiveExploration()):
        with pytest.raises(TypeError, match="ExperienceAnnotatable"):
            cb.setup(None, Plain(), "fit")


def test_adaptive_exploration_without_group_inference_says_what_to_do():
    with pytest.raises(KeyError, match="GroupInference callback BEFORE AdaptiveExploration"):
        AdaptiveExploration().annotate(planted_view(0))


@pytest.mark.parametrize("form", ["paper", "mean_preserving"])
def test_per_sample_coefficient_is_kl_coef_times_the_scale_with_adaptive_kl(form):
    """With the adaptive-KL controller, every rollout's coefficient is the controller's kl_coef of that iteration
    times the scale computed by hand from the group posterior."""
    module = StandIn(kl_coef=0.1)
    ctl = AdaptiveKLController(target=0.2, horizon=50)  # KL ~ 0.5 > target: kl_coef grows every iteration
    trainer = _fit(module, [ctl, GroupInference(seed=3), AdaptiveExploration(form=form, eta_min=0.25, eta_max=2.0)])
    coefs = [r["kl_coef"] for r in module.records]
    assert len(coefs) == 12 and all(b > a for a, b in zip(coefs, coefs[1:]))  # the controller adapted kl_coef
    for rec in module.records:
        view = rec["view"]
        g_high = int(view["group_high"][0])
        for i in range(N):
            q_high = float(view["group_posterior"][i, g_high])
            scale = q_high if form == "paper" else 0.25 + (2.0 - 0.25) * q_high
            assert float(view["kl_coef"][i]) == pytest.approx(rec["kl_coef"] * scale, rel=1e-6)
    # per-group logs: mass, returns, ARI against the planted domains, eta and KL per group
    m = trainer.callback_metrics
    for key in ("group/mass_g0", "group/return_g1", "group/g_high_flips", "group/ari_domain", "explore/eta_g0",
                "explore/kl_g1", "explore/eta_high", "explore/eta_low"):
        assert key in m, key
    assert float(m["group/ari_domain"]) > 0.9
    assert float(m["explore/eta_high"]) > float(m["explore/eta_low"])  # easy data is held tighter


def test_group_head_state_dict_resumes_the_same_trajectory():
    """A callback restored from another's state_dict (head weights + Adam state) continues exactly like it."""
    a = GroupInference(seed=1, group_steps=2, hidden_size=4)
    for it in range(3):
        a.annotate(planted_view(it))
    state = a.state_dict()
    b = GroupInference(seed=1, group_steps=2, hidden_size=4)
    b.load_state_dict(state)
    assert b.head is None  # built lazily when the first features arrive
    for it in range(3, 6):
        out_a, out_b = a.annotate(planted_view(it)), b.annotate(planted_view(it))
        torch.testing.assert_close(out_a["group_posterior"], out_b["group_posterior"], atol=0, rtol=0)
    assert a.g_high_flips == b.g_high_flips and a.num_updates == b.num_updates == 6
    # a fresh callback without the state (same seed) does NOT reproduce it: the state matters
    c = GroupInference(seed=1, group_steps=2, hidden_size=4)
    out_c = c.annotate(planted_view(6))
    assert not torch.equal(out_c["group_posterior"], a.annotate(planted_view(6))["group_posterior"])


def test_building_the_head_leaves_the_global_rng_alone():
    """The head is built at the first rollout (or after a resume): that must not shift the run's random numbers."""
    torch.manual_seed(0)
    want = torch.rand(3)
    view = planted_view(0)
    torch.manual_seed(0)
    GroupInference(hidden_size=4).annotate(view)
    torch.testing.assert_close(torch.rand(3), want, atol=0, rtol=0)


def test_callbacks_import_only_lightning_torch_and_the_stdlib():
    import ast
    import sys
    from pathlib import Path

    for name in ("group_inference.py", "adaptive_exploration.py"):
        tree = ast.parse((Path(__file__).resolve().parent.parent / "callbacks" / name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        third_party = {r for r in roots if r not in sys.stdlib_module_names and r != "__future__"}
        assert third_party <= {"lightning", "torch", "callbacks"}, (name, third_party)
