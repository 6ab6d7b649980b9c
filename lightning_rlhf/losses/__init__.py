"""Pure loss functions: tensors in, tensors out, shapes in docstrings, no Lightning."""

from lightning_rlhf.losses.preference import DPOOutput, bradley_terry_loss, dpo_loss, reward_centering_loss
from lightning_rlhf.losses.sft import masked_nll_sum

__all__ = ["DPOOutput", "bradley_terry_loss", "dpo_loss", "masked_nll_sum", "reward_centering_loss"]
