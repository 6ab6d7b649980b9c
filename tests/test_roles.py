"""Model roles (lightning_rlhf/models/roles.py): a snapshot of a trained model (frozen, out of the optimizers,
refreshed on a schedule, restored exactly on resume) and a second trained model with its own optimizer and LR
schedule, checked against a plain-PyTorch replay of the same training; DeepSpeed refuses two optimizers."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.models.roles import OptimizerRole, Snapshot

ROUND = 3  # the opponent is refreshed before steps 0, 3, 6, ...
POLICY_LR, REWARD_LR, TOTAL = 0.05, 0.02, 8


class TwoModels(RLHFModule):
    """A toy method: a policy trained against its own snapshot (an "opponent"), and a reward model with its own
    optimizer (linear decay for the policy, warm-up then constant for the reward)."""

    snapshot_roles = {"opponent": "policy"}
    optimizer_role_names = ("policy", "reward")

    def __init__(self, **kwargs) -> None:
        super().__init__(max_grad_norm=None, export_dir=None, **kwargs)

    def build_models(self) -> None:
        torch.manual_seed(0)
        self.policy = nn.Linear(4, 4)
        self.reward = nn.Linear(4, 1)

    def optimizer_roles(self) -> list[OptimizerRole]:
        return [
            OptimizerRole("policy", self.decay_groups(iter(self.policy.named_parameters()), POLICY_LR), POLICY_LR,
                          total_steps=TOTAL, warmup_steps=0, schedule="linear"),
            OptimizerRole("reward", self.decay_groups(iter(self.reward.named_parameters()), REWARD_LR), REWARD_LR,
                          warmup_steps=2, schedule="constant"),
        ]

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if self.iteration % ROUND == 0:
            self.opponent.refresh(self.policy, self.iteration)
        loss = toy_policy_loss(self.policy, self.opponent, self.reward, x)
        self.manual_backward(loss)
        self.optimizer_update(loss.detach(), role="policy")
        self.reward.zero_grad(set_to_none=True)  # the policy loss reaches the reward model too: not its step
        r_loss = toy_reward_loss(self.reward, x)
        self.manual_backward(r_loss)
        self.optimizer_update(r_loss.detach(), role="reward")
        self.log("lr_policy", self.current_lr("policy"))
        self.log("lr_reward", self.current_lr("reward"))
        self.iteration += 1


def toy_policy_loss(policy: nn.Module, opponent: nn.Module, reward: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return ((policy(x) - opponent(x)) ** 2).mean() - reward(policy(x)).mean()


def toy_reward_loss(reward: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (reward(x) - x.sum(-1, keepdim=True)).pow(2).mean()


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=g)), batch_size=2, shuffle=False)


def trainer(root, max_epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))


def test_snapshot_is_a_frozen_copy_refreshed_in_place():
    source = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    snap = Snapshot(source)
    assert all(not p.requires_grad for p in snap.parameters()) and int(snap.taken_at) == -1
    snap.train()
    assert not snap.training and not snap.model.training  # stays in eval mode
    with torch.no_grad():
        source[0].weight.add_(1.0)
    assert not torch.equal(snap.model[0].weight, source[0].weight)
    storage = snap.model[0].weight.data_ptr()
    snap.refresh(source, step=7)
    assert torch.equal(snap.model[0].weight, source[0].weight) and int(snap.taken_at) == 7
    assert snap.model[0].weight.data_ptr() == storage  # copied in place
    with pytest.raises(ValueError, match="differs"):
        snap.refresh(nn.Linear(3, 3), step=8)


def replay(epochs: int) -> tuple[dict, dict, dict]:
    """The same training as :class:`TwoModels` in plain PyTorch: two AdamW optimizers, schedules written out."""
    torch.manual_seed(0)
    policy, reward = nn.Linear(4, 4), nn.Linear(4, 1)
    opponent = nn.Linear(4, 4)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=POLICY_LR, betas=(0.9, 0.95), weight_decay=0.0)
    opt_r = torch.optim.AdamW(reward.parameters(), lr=REWARD_LR, betas=(0.9, 0.95), weight_decay=0.0)
    step = 0
    for _ in range(epochs):
        for (x,) in loader():
            if step % ROUND == 0:
                opponent.load_state_dict(policy.state_dict())
            for g in opt_p.param_groups:
                g["lr"] = POLICY_LR * (1.0 - step / TOTAL)  # linear decay over TOTAL steps
            for g in opt_r.param_groups:
                g["lr"] = REWARD_LR * min(1.0, (step + 1) / 2)  # 2 warm-up steps, then constant
            opt_p.zero_grad()
            toy_policy_loss(policy, opponent, reward, x).backward()
            opt_p.step()
            opt_r.zero_grad()
            toy_reward_loss(reward, x).backward()
            opt_r.step()
            step += 1
    return policy.state_dict(), reward.state_dict(), opponent.state_dict()


def test_two_optimizers_match_a_plain_replay_and_snapshot_stays_out_of_them(tmp_path):
    module = TwoModels()
    trainer(tmp_path, 1).fit(module, loader())
    opt_p, opt_r = module.optimizers()
    ids = lambda opt: {id(p) for g in opt.optimizer.param_groups for p in g["params"]}  # noqa: E731
    assert ids(opt_p) == {id(p) for p in module.policy.parameters()}
    assert ids(opt_r) == {id(p) for p in module.reward.parameters()}
    assert not ids(opt_p) & {id(p) for p in module.opponent.parameters()}
    assert module.opponent.model.training is False and int(module.opponent.taken_at) == 3
    # after 4 steps the schedules are at step 4: policy 0.05 * (1 - 4/8), reward 0.02 (warm-up over)
    assert module.current_lr("policy") == pytest.approx(0.025) and module.current_lr("reward") == pytest.approx(0.02)
    policy, reward, opponent = replay(1)
    for name, value in policy.items():
        torch.testing.assert_close(module.policy.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    for name, value in reward.items():
        torch.testing.assert_close(module.reward.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    for name, value in opponent.items():
        torch.testing.assert_close(module.opponent.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="no optimizer role 'critic'"):
        module.current_lr("critic")


def test_snapshot_and_both_optimizers_are_restored_exactly_on_resume(tmp_path):
    full = TwoModels()
    trainer(tmp_path / "full", 2).fit(full, loader())

    first = TwoModels()
    t1 = trainer(tmp_path / "a", 1)
    t1.fit(first, loader())
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(str(ckpt))
    saved = torch.load(str(ckpt), weights_only=False)
    assert int(saved["state_dict"]["opponent.taken_at"]) == 3
    # mid-round: the opponent (taken at step 3) is not the policy (after step 4), so it could not be rebuilt from it
    assert not torch.equal(saved["state_dict"]["opponent.model.weight"], saved["state_dict"]["policy.weight"])
    assert len(saved["optimizer_states"]) == 2 and len(saved["lr_schedulers"]) == 2

    resumed = TwoModels()
    trainer(tmp_path / "b", 2).fit(resumed, loader(), ckpt_path=str(ckpt))
    assert resumed.iteration == full.iteration == 8
    for a, b in ((resumed, full),):
        for key, value in b.state_dict().items():
            assert torch.equal(a.state_dict()[key], value), key  # policy, reward, opponent and its taken_at
    for o_res, o_full in zip(resumed.optimizers(), full.optimizers()):
        s_res, s_full = o_res.optimizer.state_dict()["state"], o_full.optimizer.state_dict()["state"]
        for k in s_full:
            assert torch.equal(s_res[k]["exp_avg"], s_full[k]["exp_avg"])
    assert math.isclose(resumed.current_lr("policy"), full.current_lr("policy"))


def test_overlapping_optimizer_roles_are_refused():
    class Overlapping(TwoModels):
        def optimizer_roles(self):
            both = [OptimizerRole(n, [{"params": list(self.policy.parameters())}], 0.1) for n in ("policy", "reward")]
            return both

    module = Overlapping()
    module.configure_model()
    with pytest.raises(RuntimeError, match="'reward' shares parameters with an earlier role"):
        module.configure_optimizers()


def test_resume_refuses_a_checkpoint_without_the_snapshot(tmp_path):
    module = TwoModels()
    module.configure_model()
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("opponent.")}
    with pytest.raises(RuntimeError, match="no weights for TwoModels's snapshot 'opponent'"):
        TwoModels().on_load_checkpoint({"state_dict": state})


def test_strategies_refuse_what_they_cannot_run():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # without deepspeed installed (see test_gpu_strategies)
    deepspeed.config = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match=r"\(policy, reward\).* one optimizer only; use trainer.strategy: ddp"):
        TwoModels(on_nonfinite="stop").check_strategy(deepspeed, batch_size=2)
    with pytest.raises(ValueError, match="snapshot of a trained model \\(opponent\\).*trainer.strategy: ddp"):
        TwoModels().check_strategy(FSDPStrategy(), batch_size=2)
