"""The CLI: every configs/**/tiny.yaml parses and trains end to end, help lists every method, bad keys fail early."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_rlhf.cli import main
from lightning_rlhf.models.factory import resolve_pretrained

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIGS = sorted(glob.glob(str(REPO / "configs" / "**" / "tiny.yaml"), recursive=True))
# offline passes run with `predict` (tested in their own files, e.g. tests/test_policy_samples.py)
TRAIN_CONFIGS = [c for c in TINY_CONFIGS if "PolicySamplesModule" not in Path(c).read_text()
                 # MetaRM trains on the policy-samples pass's file: predict, then fit, in tests/test_meta_rm_e2e.py
                 and "MetaRewardModelModule" not in Path(c).read_text()]
# short runs: each config must parse and complete a few training steps plus a validation pass
FAST = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1"]


def test_every_method_has_a_tiny_config():
    names = {Path(c).parent.name for c in TINY_CONFIGS}
    assert {"sft", "rm", "dpo"} <= names


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=lambda c: Path(c).parent.name)
def test_tiny_config_trains_end_to_end(config, in_tmp):
    cli = main(["fit", "-c", config, *FAST])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step >= 1 and module.iteration >= 1
    log_dir = Path(trainer.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*")), "TensorBoard events missing"
    export = Path(module.resolved_export_dir())
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    assert (export / "tokenizer.json").exists() or (export / "tokenizer_config.json").exists()
    # the exported trunk differs from the initial weights: training changed the parameters
    init = load_file(str(Path(resolve_pretrained(module.model_name_or_path)) / "model.safetensors"))
    trained = load_file(str(export / "model.safetensors"))
    common = [k for k in init if k in trained and k.startswith("model.layers.")]
    assert common and any(not torch.equal(init[k], trained[k]) for k in common)


def test_fit_help_lists_methods_and_data_modules(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("SFTModule", "RewardModelModule", "DPOModule", "PreferenceDataModule", "DemonstrationDataModule", "PromptDataModule"):
        assert name in out, name


def test_method_help_shows_documented_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "DPOModule"])
    out = capsys.readouterr().out
    assert "--model.beta" in out and "KL strength" in out and "precompute_ref_logprobs" in out


def test_print_config_and_overrides(capsys):
    config = str(REPO / "configs" / "dpo" / "tiny.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "-c", config, "--model.init_args.beta=0.3", "--print_config"])
    out = capsys.readouterr().out
    assert "beta: 0.3" in out and "DPOModule" in out


def test_unknown_key_fails_at_parse_time_naming_the_key(capsys):
    config = str(REPO / "configs" / "dpo" / "tiny.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", config, "--model.init_args.betta=0.3"])
    assert e.value.code != 0
    assert "betta" in capsys.readouterr().err


def test_wrongly_typed_value_fails_at_parse_time(capsys):
    config = str(REPO / "configs" / "dpo" / "tiny.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", config, "--model.init_args.beta=lots"])
    assert e.value.code != 0
    assert "beta" in capsys.readouterr().err
