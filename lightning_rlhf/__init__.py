"""lightning-rlhf: RLHF methods (SFT, reward models, DPO, PPO and research methods) on PyTorch Lightning."""

__version__ = "0.1.0"
