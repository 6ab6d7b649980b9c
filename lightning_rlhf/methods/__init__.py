"""One LightningModule per method."""

from lightning_rlhf.methods.aihf import AIHFModule
from lightning_rlhf.methods.aihf_dpo import AIHFDPOModule
from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.methods.contrastive import BaselineSamplerModule, ContrastivePPOModule
from lightning_rlhf.methods.dpo import DPOModule
from lightning_rlhf.methods.gil import GILModule
from lightning_rlhf.methods.meta_rm import MetaRewardModelModule
from lightning_rlhf.methods.policy_samples import PolicySamplesModule
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.methods.reward_model import RewardModelModule
from lightning_rlhf.methods.sft import SFTModule

__all__ = [
    "AIHFDPOModule", "AIHFModule", "BaselineSamplerModule", "ContrastivePPOModule", "DPOModule", "GILModule",
    "MetaRewardModelModule",
    "PolicySamplesModule", "PPOModule", "RLHFModule", "RewardModelModule", "SFTModule",
]
