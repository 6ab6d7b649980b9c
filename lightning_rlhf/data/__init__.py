"""Data modules for preferences, demonstrations, prompts and sample sets, several of them as named streams, and the
batch containers they produce."""

from lightning_rlhf.data.batches import PreferenceBatch, PromptBatch, SampleSetBatch, TokenBatch
from lightning_rlhf.data.modules import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.data.modules import SampleSetDataModule
from lightning_rlhf.data.sources import DataValidationError
from lightning_rlhf.data.streams import MultiStreamDataModule

__all__ = [
    "DataValidationError",
    "DemonstrationDataModule",
    "MultiStreamDataModule",
    "PreferenceBatch",
    "PreferenceDataModule",
    "PromptBatch",
    "PromptDataModule",
    "SampleSetBatch",
    "SampleSetDataModule",
    "TokenBatch",
]
