"""MultiStreamDataModule: dict batches, each non-primary stream cycling through its own epochs (orders recomputed here
from the documented ``randperm(seed + epoch)``), exact resume of every stream from a checkpoint, validation errors
naming the stream and field; and PPO with a ``ptx`` stream killed (SIGKILL) and resumed exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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
def test_old_ptx_data_key_and_a_missing_ptx_stream_are_refused_naming_the_ptx_stream(tmp_path):
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.methods import PPOModule

    reward = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}
    with pytest.raises(ValueError, match="model.ptx_data was replaced by a `ptx` data stream.*MultiStreamDataModule"):
        PPOModule(model_name_or_path="builtin:tiny-llama", reward_fn=reward, ptx_coef=0.1, ptx_data={"batch_size": 2})
    module = PPOModule(model_name_or_path="builtin:tiny-llama", reward_fn=reward, ptx_coef=0.1, export_dir=None)
    assert module.required_streams == ("prompts", "ptx")
    prompts = dict(train_path="builtin:hh-rlhf", max_prompt_length=48, skip_invalid_rows=True, max_train_rows=8)
    with pytest.raises(ValueError, match=r"needs the data stream\(s\) \['ptx'\]"):  # a MultiStream without ptx
        _trainer(tmp_path, max_steps=1).fit(module, MultiStreamDataModule(streams={"prompts": PromptDataModule(**prompts)}))
    with pytest.raises(ValueError, match="ptx_coef > 0 needs a `ptx` data stream"):  # a plain prompt data module
        _trainer(tmp_path, max_steps=1).fit(module, PromptDataModule(**prompts))


class _Capture(L.Callback):
    """Keeps each step's ptx batch, the policy weights before the step and the step's outputs."""

    def __init__(self) -> None:
        self.ptx: list[Any] = []
        self.policy: list[dict[str, torch.Tensor]] = []
        self.outputs: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ptx.append(batch["ptx"])
        self.policy.append({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: float(v) for k, v in outputs.items()})


def test_ppo_ptx_term_is_the_nll_of_each_minibatch_slice_of_the_ptx_batch(tmp_path):
    """4 rollouts in minibatches of 2 (2 optimizer steps) and a ptx batch of 4 rows: step i adds the token-mean NLL
    of ptx rows [2i, 2i+2). With a vanishing policy lr (1e-30) the policy does not move, so the logged ptx/loss is
    the mean of the two slices' NLLs under the initial policy, recomputed here with a plain log-softmax."""
    from lightning_rlhf.data import DemonstrationDataModule, PromptDataModule
    from lightning_rlhf.methods import PPOModule

    module = PPOModule(model_name_or_path="builtin:tiny-llama", reward_fn={
        "class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}, lr=1e-30,
        critic_lr=1e-3, ppo_epochs=1, mini_batch_size=2, micro_batch_size=2, max_new_tokens=8, log_samples_every_n=0,
        export_dir=None, ptx_coef=0.5, max_iterations=2)
    rows = dict(train_path="builtin:hh-rlhf", max_prompt_length=48, skip_invalid_rows=True, max_train_rows=8)
    dm = MultiStreamDataModule(streams={"prompts": PromptDataModule(batch_size=4, **rows),
                                        "ptx": DemonstrationDataModule(batch_size=4, max_length=96, **rows)})
    capture = _Capture()
    _trainer(tmp_path, max_steps=-1, enable_checkpointing=False, callbacks=[capture]).fit(module, dm)
    assert len(capture.outputs) == 2
    for ptx, weights, out in zip(capture.ptx, capture.policy, capture.outputs):
        module.policy.load_state_dict(weights)
        nlls = []
        for lo, hi in ((0, 2), (2, 4)):
            ids, mask, loss_mask = ptx.input_ids[lo:hi], ptx.attention_mask[lo:hi], ptx.loss_mask[lo:hi]
            with torch.no_grad():
                logits = module.policy(input_ids=ids, attention_mask=mask).logits.double()  # right padding
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            m = loss_mask[:, 1:].double()
            nlls.append(float(-(logp * m).sum() / m.sum()))
        assert out["ptx/loss"] == pytest.approx(sum(nlls) / 2, abs=1e-4)
    assert capture.ptx[0].input_ids.shape[0] == 4


class StreamStepRecorder(StepRecorder):
    """:class:`tests.test_resume.StepRecorder` for dict batches: the prompt ids of the ``prompts`` stream, and the
    rows (token sums) of the ``ptx`` batch under ``ptx_rows``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch["prompts"], batch_idx)
        records = _read(Path(self.path))
        records[-1]["rows"] = [records[-1]["rows"], batch["ptx"].input_ids.sum(1).tolist()]
        Path(self.path).write_text("".join(json.dumps(r) + "\n" for r in records))


# 4 iterations of 4 prompts (12 prompts: the primary's epoch 1 starts at iteration 4); ptx: 4 demonstrations in
# batches of 2, split over the 2 minibatches of an iteration (its epoch 1 starts at iteration 3). Killed after
# iteration 2, i.e. at the end of the ptx stream's epoch 0.
PTX_ARGS = [
    "fit", "-c", str(REPO / "configs" / "ppo" / "tiny_ptx.yaml"), "--model.max_iterations=4", "--model.ppo_epochs=1",
    "--model.mini_batch_size=2", "--model.micro_batch_size=2", "--model.max_new_tokens=8",
    "--model.log_samples_every_n=0", "--data.init_args.streams.prompts.init_args.batch_size=4",
    "--data.init_args.streams.prompts.init_args.max_train_rows=12",
    "--data.init_args.streams.ptx.init_args.batch_size=2", "--data.init_args.streams.ptx.init_args.max_train_rows=4",
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
    """A reference run, a CLI subprocess SIGKILLed before iteration 3, and its resume: the same scores, losses (ptx
    included), KL, moments, data rows of both streams and final weights. 110 s on a 2-core machine shared by 6
    jobs, where tests/test_resume.py's PPO SIGKILL test (same machinery, 4 iterations) took 180 s."""
    from lightning_rlhf.cli import main

    monkeypatch.chdir(tmp_path)
    main([*PTX_ARGS, *_ptx_overlay(tmp_path, "ref")])
    proc = _cli_subprocess([*PTX_ARGS, *_ptx_overlay(tmp_path, "run", signal_at=2)], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    ptx_state = state["MultiStreamDataModule"]["streams"]["ptx"]
    assert state["iteration"] == 2 and (ptx_state["epoch"], ptx_state["position"]) == (1, 0)

    cli = main([*PTX_ARGS, *_ptx_overlay(tmp_path, "run"), "--ckpt_path=last"])
    assert cli.model.iteration == 4
    records, reference = _read(tmp_path / "run.jsonl"), _read(tmp_path / "ref.jsonl")
    assert [r["attributes"][0] for r in records] == [1, 2, 3, 4]  # iterations 3 and 4 came from the resumed run
    # the ptx stream: iterations 1-2 are its epoch 0 (each of the 4 demonstrations once), 3-4 its epoch 1 (another
    # shuffle: randperm(4) seeded 1 and 2 - the config's ptx seed is 1 - differ in their first 2 positions)
    ptx_rows = [r["rows"][1] for r in reference]
    assert len(set(sum(ptx_rows[:2], []))) == 4 and set(sum(ptx_rows[2:], [])) == set(sum(ptx_rows[:2], []))
    assert _perm(4, 1)[:2] != _perm(4, 2)[:2] and ptx_rows[2] != ptx_rows[0]
    assert all(r["metrics"][4] > 0 for r in reference)  # ptx/loss
    _assert_same_run(records, reference)
    _assert_same_weights(tmp_path / "run_export", tmp_path / "ref_export")


DDP_SCRIPT = """
import json, sys
import lightning as L
from tests.test_streams import _Recorder, _stream
from lightning_rlhf.data import MultiStreamDataModule

out, ckpt = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
dm = MultiStreamDataModule(streams={"a": _stream(8, 1, 0), "b": _stream(6, 1, 5)})
module = _Recorder()
saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=out + "/ck", every_n_train_steps=1, save_top_k=-1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, limit_val_batches=0,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[saver], default_root_dir=out)
trainer.fit(module, dm, ckpt_path=ckpt)
with open(f"{out}/rank{trainer.global_rank}{'_resumed' if ckpt else ''}.json", "w") as f:
    json.dump(module.seen, f)
"""


@pytest.mark.slow
def test_two_ddp_ranks_share_every_stream_like_one_process_and_resume(tmp_path):
    """2 gloo ranks with per-rank batch 1: at every step, rank 0's and rank 1's rows of each stream are the 1-process
    batch of 2 (the streams' global orders do not depend on the number of ranks); a 2-rank resume from the step-5
    checkpoint repeats steps 6-8. Two 2-process launches: about 2 minutes on a busy 2-core machine."""
    from tests.test_ddp import subprocess_env

    one = _Recorder()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(one, _streams())
    script = tmp_path / "ddp_streams.py"
    script.write_text(DDP_SCRIPT)
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step, (r0, r1, whole) in enumerate(zip(*ranks, one.seen)):
        for name in ("a", "b"):
            assert r0[name] + r1[name] == whole[name], (step, name)
    assert len(ranks[0]) == len(one.seen) == 8

    ckpt = tmp_path / "ck" / "epoch=1-step=5.ckpt"
    second = subprocess.run([sys.executable, str(script), str(tmp_path), str(ckpt)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}_resumed.json").read_text()) == ranks[r][5:]
