"""MetaStepSchedule (callbacks/meta_step.py) with a stand-in module that is not one of ours: meta steps on exactly the
steps named by every_n_steps / warmup_steps / after_shift, also across a checkpoint resume, and a clear error for a
module without the protocol."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from callbacks.meta_step import MetaStepSchedule
from callbacks.protocols import MetaStepScheduled


class StandIn(L.LightningModule):
    """A plain regression module implementing MetaStepScheduled: the "score spread" on the batch of optimizer step ``i``
    is ``spreads[i]``; it records every step's decision and every spread query."""

    def __init__(self, spreads: list[float]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.spreads = spreads
        self.meta_step_enabled = False
        self.meta_steps = 0
        self.decisions: list[tuple[int, bool]] = []
        self.queried: list[int] = []

    def meta_score_spread(self, batch) -> float:
        step = self.trainer.global_step
        self.queried.append(step)
        return self.spreads[step]

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step
        self.decisions.append((step, bool(self.meta_step_enabled)))
        self.meta_steps += int(self.meta_step_enabled)
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int) -> DataLoader:
    rows = [{"x": torch.full((2,), float(i))} for i in range(n)]
    return DataLoader(rows, batch_size=1, shuffle=False)


def _fit(module, schedule, steps: int, tmp_path=None, ckpt_path=None, every_step_ckpt=False):
    callbacks = [schedule]
    if every_step_ckpt:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=every_step_ckpt, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, _loader(20), ckpt_path=ckpt_path)
    return trainer


def test_the_stand_in_implements_the_protocol():
    assert isinstance(StandIn([]), MetaStepScheduled)


def test_every_step_by_default_like_the_paper():
    module = StandIn([])
    _fit(module, MetaStepSchedule(), 5)
    assert module.decisions == [(i, True) for i in range(5)] and module.meta_steps == 5
    assert module.queried == []  # no after_shift: no spread measured


def test_every_n_steps_after_warmup():
    module = StandIn([])
    schedule = MetaStepSchedule(every_n_steps=3, warmup_steps=2)
    _fit(module, schedule, 10)
    assert [s for s, meta in module.decisions if meta] == [2, 5, 8]
    assert [s for s, _ in module.decisions] == list(range(10))
    assert schedule.num_scheduled == 3 and schedule.steps_seen == 10


def test_after_shift_starts_meta_steps_once_the_spread_falls_below_the_threshold():
    spreads = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.9, 0.9, 0.9, 0.9]  # below 0.55 first at step 5, then back up
    module = StandIn(spreads)
    schedule = MetaStepSchedule(after_shift=0.55)
    _fit(module, schedule, 10)
    assert [s for s, meta in module.decisions if meta] == [5, 6, 7, 8, 9]  # latched once shifted
    assert module.queried == [0, 1, 2, 3, 4, 5]  # measured until it first fell below, never after
    assert schedule.shifted and schedule.last_spread == 0.5


def test_after_shift_is_measured_on_scheduled_steps_only():
    spreads = [0.1] * 10
    module = StandIn(spreads)
    _fit(module, MetaStepSchedule(every_n_steps=2, warmup_steps=3, after_shift=0.5), 8)
    assert module.queried == [3]
    assert [s for s, meta in module.decisions if meta] == [3, 5, 7]


@pytest.mark.parametrize("kwargs", [dict(every_n_steps=2, warmup_steps=1),
                                    dict(every_n_steps=1, after_shift=0.55)])
def test_resume_from_a_checkpoint_takes_meta_steps_on_the_same_steps(tmp_path, kwargs):
    spreads = [1.0, 0.9, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    reference = StandIn(spreads)
    _fit(reference, MetaStepSchedule(**kwargs), 9)

    first = StandIn(spreads)
    _fit(first, MetaStepSchedule(**kwargs), 4, tmp_path=tmp_path, every_step_ckpt=True)
    resumed = StandIn(spreads)
    schedule = MetaStepSchedule(**kwargs)
    _fit(resumed, schedule, 9, tmp_path=tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert [s for s, _ in resumed.decisions] == list(range(4, 9))
    assert first.decisions + resumed.decisions == reference.decisions
    if "after_shift" in kwargs:  # shifted at step 2, before the checkpoint: the latch came back from it
        assert resumed.queried == [] and schedule.shifted
    assert schedule.steps_seen == 9


def test_a_module_without_the_protocol_gets_a_clear_error():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["x"]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="meta_score_spread, meta_step_enabled, meta_steps"):
        _fit(Plain(), MetaStepSchedule(), 1)


def test_bad_arguments_name_the_flag():
    with pytest.raises(ValueError, match="every_n_steps"):
        MetaStepSchedule(every_n_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        MetaStepSchedule(warmup_steps=-1)
    with pytest.raises(ValueError, match="after_shift"):
        MetaStepSchedule(after_shift=0.0)
