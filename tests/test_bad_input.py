"""Bad input fails at start, within seconds, with a message naming the flag or the file at fault (issue 15, item 5)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from lightning_rlhf.cli import main
from lightning_rlhf.data.sources import DATA_DIR, DataValidationError
from lightning_rlhf.models.factory import check_model_path, looks_like_local_path

REPO = Path(__file__).resolve().parent.parent
SFT = str(REPO / "configs" / "sft" / "tiny.yaml")
PPO = str(REPO / "configs" / "ppo" / "tiny.yaml")
QUICK = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--model.init_args.export_dir=null"]


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def test_path_like_model_names_are_told_from_hub_ids(in_tmp):
    (in_tmp / "runs").mkdir()
    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M", "builtin:tiny-llama"):
        assert not looks_like_local_path(hub_id), hub_id
    for path in ("runs/sft_exprt", "./sft", "../x", "/no/such/folder", "a/b/c", "~/models/x", "folder/"):
        assert looks_like_local_path(path), path
    check_model_path("HuggingFaceTB/SmolLM2-135M", "model.model_name_or_path")  # a hub id is not checked here
    check_model_path(str(in_tmp / "runs"), "model.model_name_or_path")  # exists


def test_mistyped_local_model_folder_fails_at_once_naming_the_flag(in_tmp):
    (in_tmp / "runs" / "sft_export").mkdir(parents=True)
    with Timer() as t, pytest.raises(FileNotFoundError, match="model.model_name_or_path") as e:
        main(["fit", "-c", SFT, *QUICK, "--model.init_args.model_name_or_path=runs/sft_exprt"])
    assert "runs/sft_exprt" in str(e.value) and "sft_export" in str(e.value)  # the folder's neighbours are listed
    assert t.seconds < 30, t.seconds  # no hub retries (about 50 s offline)


@pytest.mark.parametrize("flag", ["reward_model_name_or_path", "ref_model_name_or_path", "critic_model_name_or_path"])
def test_every_model_path_flag_is_checked_before_anything_loads(in_tmp, flag):
    extra = ["--model.init_args.reward_fn=null"] if flag == "reward_model_name_or_path" else []
    with Timer() as t, pytest.raises(FileNotFoundError, match=f"model.{flag}"):
        main(["fit", "-c", PPO, *QUICK, *extra, f"--model.init_args.{flag}=./no_such_model"])
    assert t.seconds < 30, t.seconds


def test_truncated_jsonl_gz_names_the_file(in_tmp):
    full = (DATA_DIR / "hh_demonstrations_train.jsonl.gz").read_bytes()
    bad = in_tmp / "demos.jsonl.gz"
    bad.write_bytes(full[: len(full) // 2])
    with Timer() as t, pytest.raises(DataValidationError, match="truncated or corrupt") as e:
        main(["fit", "-c", SFT, *QUICK, f"--data.init_args.train_path={bad}"])
    assert str(bad) in str(e.value)
    assert not isinstance(e.value, EOFError)
    assert t.seconds < 30, t.seconds


@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_batch_size_fails_at_construction_naming_the_flag(in_tmp, value):
    with Timer() as t, pytest.raises(ValueError, match=r"data\.batch_size must be >= 1") as e:
        main(["fit", "-c", SFT, *QUICK, f"--data.init_args.batch_size={value}"])
    assert "Given value" not in str(e.value)
    assert t.seconds < 30, t.seconds


def test_micro_batch_larger_than_the_batch_warns(in_tmp, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_rlhf"):
        main(["fit", "-c", SFT, *QUICK, "--data.init_args.batch_size=2", "--model.init_args.micro_batch_size=4",
              "--data.init_args.max_train_rows=4"])
    assert any("model.micro_batch_size (4) > data.batch_size (2)" in r.getMessage() for r in caplog.records)


def test_construction_errors_are_not_buried_in_an_argument_dump(in_tmp):
    with pytest.raises(ValueError) as e:
        main(["fit", "-c", SFT, *QUICK, "--model.init_args.lr=-1"])
    message = str(e.value)
    assert message.startswith("model.lr must be positive")
    assert "Namespace(" not in message and "Union subtypes" not in message


def test_temperature_error_names_the_real_flag(in_tmp):
    with pytest.raises(ValueError) as e:
        main(["fit", "-c", PPO, *QUICK, "--model.init_args.temperature=0"])
    assert "model.temperature must be > 0" in str(e.value) and "do_sample" not in str(e.value)


def test_an_existing_export_is_not_overwritten_without_the_flag(in_tmp):
    earlier = in_tmp / "sft_export"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")  # an earlier run's export
    args = ["fit", "-c", SFT, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", f"--model.init_args.export_dir={earlier}"]
    with Timer() as t, pytest.raises(FileExistsError, match="model.export_dir: .* already holds an exported model"):
        main(args)
    assert t.seconds < 30 and (earlier / "config.json").read_text() == "{}"
    main([*args, "--model.init_args.overwrite_export=true", "--data.init_args.max_train_rows=4"])
    assert (earlier / "model.safetensors").exists()
