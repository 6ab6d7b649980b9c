"""Data modules for preferences, demonstrations and prompts, and the batch containers they produce."""

from lightning_rlhf.data.batches import PreferenceBatch, PromptBatch, TokenBatch
from lightning_rlhf.data.modules import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.data.sources import DataValidationError

__all__ = [
    "DataValidationError",
    "DemonstrationDataModule",
    "PreferenceBatch",
    "PreferenceDataModule",
    "PromptBatch",
    "PromptDataModule",
    "TokenBatch",
]
