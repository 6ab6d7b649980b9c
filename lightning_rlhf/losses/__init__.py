"""Pure loss functions: tensors in, tensors out, shapes in docstrings, no Lightning."""

from lightning_rlhf.losses.aihf import aihf_dpo_objective, aihf_reward_loss, nll_demo_loss, spin_loss
from lightning_rlhf.losses.meta_rm import difference_loss, pairwise_abs_differences, within_prompt_std
from lightning_rlhf.losses.preference import DPOOutput, bradley_terry_loss, dpo_loss, reward_centering_loss
from lightning_rlhf.losses.sft import masked_nll_sum

__all__ = [
    "DPOOutput", "aihf_dpo_objective", "aihf_reward_loss", "bradley_terry_loss", "difference_loss", "dpo_loss",
    "masked_nll_sum", "nll_demo_loss", "pairwise_abs_differences", "reward_centering_loss", "spin_loss",
    "within_prompt_std",
]
