"""Checkpoints are verified before loading: damaged, truncated or empty files are refused naming the file."""

from __future__ import annotations

import os
import random
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_rlhf.checkpoint_io import AtomicCheckpointIO, CorruptCheckpointError, verify_checkpoint
from lightning_rlhf.cli import main
from tests.test_resume import _overlay

REPO = Path(__file__).resolve().parent.parent
SFT = ["fit", "-c", str(REPO / "configs" / "sft" / "tiny.yaml"), "--data.batch_size=4", "--data.max_train_rows=16",
       "--data.max_length=128", "--data.max_prompt_length=96", "--data.skip_invalid_rows=true"]


def _largest_record_data_offset(path: Path) -> tuple[int, int]:
    """(offset, size) of the stored bytes of the largest record of a torch.save zip archive."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    cwd = os.getcwd()
    os.chdir(tmp)  # the run's config.yaml goes to the working directory (no logger)
    try:
        main([*SFT, *_overlay(tmp, "run", 2)])
    finally:
        os.chdir(cwd)
    path = tmp / "run_ckpt" / "last.ckpt"
    verify_checkpoint(str(path))  # a freshly written checkpoint passes
    return path


def test_four_kb_of_random_bytes_in_a_checkpoint_are_refused_naming_the_file(trained_checkpoint, in_tmp):
    damaged = in_tmp / "damaged.ckpt"
    shutil.copy(trained_checkpoint, damaged)
    start, size = _largest_record_data_offset(damaged)
    assert size > 3 * 4096
    data = bytearray(damaged.read_bytes())
    offset = start + size // 2 - 2048
    data[offset : offset + 4096] = random.Random(0).randbytes(4096)
    damaged.write_bytes(bytes(data))
    # torch.load alone takes it: the damage is inside a tensor's storage
    state = torch.load(damaged, weights_only=True, map_location="cpu")
    assert state["global_step"] == 2

    with pytest.raises(CorruptCheckpointError, match="fails its checksum") as e:
        AtomicCheckpointIO().load_checkpoint(str(damaged))
    assert str(damaged) in str(e.value)
    # and through the command line, before anything is restored
    with pytest.raises(CorruptCheckpointError) as e:
        main([*SFT, *_overlay(in_tmp, "resumed", 3), f"--ckpt_path={damaged}"])
    assert str(damaged) in str(e.value)
    assert not (in_tmp / "resumed.jsonl").exists()  # no step ran


@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_or_empty_checkpoint_gives_the_same_clear_message(trained_checkpoint, in_tmp, keep):
    cut = in_tmp / "cut.ckpt"
    data = trained_checkpoint.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match="empty" if keep == 0 else "truncated or corrupt") as e:
        main([*SFT, *_overlay(in_tmp, "resumed", 3), f"--ckpt_path={cut}"])
    assert str(cut) in str(e.value) and not isinstance(e.value, EOFError)
