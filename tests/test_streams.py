"""MultiStreamDataModule: dict batches, each non-primary stream cycling through its own epochs (orders recomputed here
from the documented ``randperm(seed + epoch)``), exact resume of every stream from a checkpoint, validation errors
naming the stream and field; and PPO with a ``ptx`` stream killed (SIGKILL) and resumed exactly."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_rlhf.data import MultiStreamDataModule, PreferenceDataModule
from lightning_rlhf.models.factory import load_tokenizer
from tests.test_resume import REPO, StepRecorder, _assert_same_run, _assert_same_weights, _cli_subprocess, _overlay
from tests.test_resume import _read

PREF = "lightning_rlhf.data.PreferenceDataModule"


def _stream(rows: int, batch_size: int, seed: int) -> dict[str, Any]:
    return {"class_path": PREF, "init_args": {"train_path": "builtin:hh-rlhf", "max_train_rows": rows,
                                              "batch_size": batch_size, "seed": seed, "max_length": 96,
                                              "max_prompt_length": 48, "skip_invalid_rows": True,
                                              "max_val_rows": 2}}


def _streams(**kw: Any) -> MultiStreamDataModule:
    return MultiStreamDataModule(streams={"a": _stream(8, 2, 0), "b": _stream(6, 2, 5)}, **kw)


class _Recorder(L.LightningModule):
    """Records the dataset rows of every stream's batch per training step."""

    required_streams = ("a", "b")

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.tokenizer = load_tokenizer("builtin:tiny-llama")
        self.seen: list[dict[str, list[int]]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert list(batch) == ["a", "b"]
        self.seen.append({name: b.index.tolist() for name, b in batch.items()})
        return (self.w - 1.0) ** 2

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kw: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, default_root_dir=tmp_path, **kw)


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_each_stream_cycles_through_its_own_epochs(tmp_path):
    module = _Recorder()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(module, _streams())
    assert len(module.seen) == 8  # the primary "a" (8 rows, batch 2) defines the epoch: 4 steps x 2 epochs
    a = _perm(8, 0) + _perm(8, 1)  # primary: seed 0, epochs 0 and 1
    b = _perm(6, 5) + _perm(6, 6) + _perm(6, 7)  # "b": seed 5, its own epochs 0, 1, 2 (3 batches each)
    assert [s["a"] for s in module.seen] == [a[i : i + 2] for i in range(0, 16, 2)]
    assert [s["b"] for s in module.seen] == [b[i : i + 2] for i in range(0, 16, 2)]
    assert _perm(6, 5) != _perm(6, 6)  # a new shuffle per epoch of "b"


def test_resume_from_a_checkpoint_continues_every_stream(tmp_path):
    whole = _Recorder()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(whole, _streams())

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1)
    first = _Recorder()
    _trainer(tmp_path, max_epochs=2, max_steps=5, callbacks=[ckpt]).fit(first, _streams())
    state = torch.load(tmp_path / "ck" / "epoch=1-step=5.ckpt", weights_only=True)["MultiStreamDataModule"]
    # after 5 steps "b" (3 batches per epoch) is in its epoch 1, 2 batches in; the primary in its epoch 1, 1 batch in
    assert state["streams"]["b"]["epoch"] == 1 and state["streams"]["b"]["position"] == 2
    assert state["streams"]["a"]["train_sampler"]["epoch"] == 1

    resumed = _Recorder()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(resumed, _streams(),
                                                                     ckpt_path=tmp_path / "ck" / "epoch=1-step=5.ckpt")
    assert first.seen + resumed.seen == whole.seen


def test_validation_uses_the_val_stream_split():
    dm = _streams(val_stream="b")
    dm.set_tokenizer(load_tokenizer("builtin:tiny-llama"))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch.num_pairs == 2 and dm.batch_size == 2 and dm.domain_names == dm.streams["a"].domain_names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"streams": {}}, "data.streams is empty"),
        ({"streams": {"a": {"class_path": "lightning_rlhf.data.NoSuchModule"}}}, "data.streams.a.class_path: cannot import"),
        ({"streams": {"a": {"class_path": "torch.nn.Linear"}}}, "data.streams.a.class_path: .* not one of"),
        ({"streams": {"a": {"class_path": PREF, "init_args": {"batch_sise": 2}}}}, "data.streams.a.init_args: .*batch_sise"),
        ({"streams": {"a": {"class_path": PREF, "init_args": {"val_fraction": 2.0}}}}, "data.streams.a: val_fraction"),
        ({"streams": {"a": {"class_path": PREF, "args": {}}}}, "data.streams.a: unknown keys"),
        ({"streams": {"a": _stream(8, 2, 0)}, "primary": "b"}, "data.primary='b' is not one of data.streams"),
        ({"streams": {"a": _stream(8, 2, 0)}, "val_stream": "x"}, "data.val_stream='x'"),
    ],
)
def test_bad_streams_fail_at_construction_naming_stream_and_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiStreamDataModule(**kwargs)


def test_a_method_missing_a_stream_or_taking_none_is_refused():
    dm = MultiStreamDataModule(streams={"a": _stream(8, 2, 0)})
    with pytest.raises(ValueError, match=r"needs the data stream\(s\) \['b'\].*data.streams.b"):
        dm.check_required_streams(_Recorder())
    with pytest.raises(ValueError, match="takes one batch type"):
        dm.check_required_streams(L.LightningModule())


def test_the_cli_parses_streams_from_yaml(in_tmp):
    from lightning_rlhf.cli import main

    cli = main(["fit", "-c", str(REPO / "configs/ppo/tiny_ptx.yaml"), "--trainer.logger=false",
                "--model.max_iterations=1", "--model.max_new_tokens=4", "--model.export_dir=null",
                "--data.init_args.streams.prompts.init_args.max_train_rows=8",
                "--data.init_args.streams.prompts.init_args.batch_size=4"])
    assert isinstance(cli.datamodule, MultiStreamDataModule) and cli.datamodule.stream_names == ["prompts", "ptx"]
    assert cli.model.iteration == 1


# ---------------------------------------------------------------------------------------------------- PPO + ptx
class StreamStepRecorder(StepRecorder):
    """:class:`tests.test_resume.StepRecorder` for dict batches: the prompt ids of the ``prompts`` stream, and the
    rows (token sums) of the ``ptx`` batch under ``ptx_rows``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch["prompts"], batch_idx)
        records = _read(Path(self.path))
        records[-1]["rows"] = [records[-1]["rows"], batch["ptx"].input_ids.sum(1).tolist()]
        Path(self.path).write_text("".join(json.dumps(r) + "\n" for r in records))


# 5 iterations of 4 prompts (16 prompts: the primary's epoch 1 starts at iteration 5); ptx: 6 demonstrations in
# batches of 2 (its epoch 1 starts at iteration 4). Killed after iteration 2.
PTX_ARGS = [
    "fit", "-c", str(REPO / "configs" / "ppo" / "tiny_ptx.yaml"), "--model.max_iterations=5", "--model.ppo_epochs=2",
    "--model.mini_batch_size=2", "--model.micro_batch_size=2", "--model.max_new_tokens=8",
    "--model.log_samples_every_n=0", "--data.init_args.streams.prompts.init_args.batch_size=4",
    "--data.init_args.streams.prompts.init_args.max_train_rows=16",
    "--data.init_args.streams.ptx.init_args.batch_size=2", "--data.init_args.streams.ptx.init_args.max_train_rows=6",
]
PTX_RECORD = {
    "metrics": ["score/mean", "kl", "policy/loss", "value/loss", "ptx/loss", "lr"],
    "attributes": ["iteration", "kl_coef", "reward_mean", "reward_var", "global_step"],
}


def _ptx_overlay(tmp: Path, name: str, signal_at: int = -1) -> list[str]:
    args = _overlay(tmp, name, -1, signal_at=signal_at, recorder=PTX_RECORD)
    cfg = Path(args[1])
    text = cfg.read_text().replace("tests.test_resume.StepRecorder", "tests.test_streams.StreamStepRecorder")
    cfg.write_text(text)
    return [*args, "--trainer.max_steps=-1"]


def test_ppo_with_a_ptx_stream_sigkilled_and_resumed_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    from lightning_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    main([*PTX_ARGS, *_ptx_overlay(tmp_path, "ref")])
    proc = _cli_subprocess([*PTX_ARGS, *_ptx_overlay(tmp_path, "run", signal_at=2)], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["iteration"] == 2 and state["MultiStreamDataModule"]["streams"]["ptx"]["position"] == 2

    cli = main([*PTX_ARGS, *_ptx_overlay(tmp_path, "run"), "--ckpt_path=last"])
    assert cli.model.iteration == 5
    records, reference = _read(tmp_path / "run.jsonl"), _read(tmp_path / "ref.jsonl")
    assert [r["attributes"][0] for r in records] == [1, 2, 3, 4, 5]
    # the ptx stream: iterations 1-3 are its epoch 0 (each of the 6 demonstrations once), 4-5 its epoch 1 (another
    # shuffle: randperm(6) seeded 0 and 1 differ in their first 4 positions)
    ptx_rows = [r["rows"][1] for r in reference]
    assert len(set(sum(ptx_rows[:3], []))) == 6 and set(sum(ptx_rows[3:], [])) <= set(sum(ptx_rows[:3], []))
    assert _perm(6, 0)[:4] != _perm(6, 1)[:4] and ptx_rows[3:5] != ptx_rows[0:2]
    _assert_same_run(records, reference)
    _assert_same_weights(tmp_path / "run_export", tmp_path / "ref_export")
