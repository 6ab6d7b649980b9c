"""LoRA adapters (``model.lora_r``): only the adapters train, the export is a plain merged model that computes what
the adapted model computes, and the settings that cannot work fail at start."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_rlhf.cli import main
from lightning_rlhf.data import DemonstrationDataModule
from lightning_rlhf.methods import DPOModule, RewardModelModule, SFTModule

import peft  # (in the test extra: these tests run in CI, never skip)

REPO = Path(__file__).resolve().parent.parent


def test_only_adapters_train_and_the_merged_export_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    module = SFTModule(lr=1e-2, lora_r=4, lora_alpha=8.0, lora_target_modules=["q_proj", "v_proj"],
                       export_dir=str(tmp_path / "export"))
    module.configure_model()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    # tiny-llama: 2 layers, hidden 64; q_proj and v_proj are 64x64: A (4x64) + B (64x4) each
    assert all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * 2 * (4 * 64 + 64 * 4)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    dm = DemonstrationDataModule(max_train_rows=16, batch_size=8, max_length=128, max_prompt_length=96,
                                 skip_invalid_rows=True)
    dm.set_tokenizer(module.tokenizer)
    L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(module, datamodule=dm)
    assert all(torch.equal(p, frozen_before[n]) for n, p in module.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p.detach(), torch.zeros_like(p)) for n, p in module.named_parameters() if "lora_B" in n)

    export = tmp_path / "export"
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(export)  # a plain folder: no peft needed to load it
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(5, 4000, (2, 12))
    mask = torch.ones_like(ids)
    module.policy.eval()
    with torch.no_grad():
        adapted = module.lm_forward(module.policy, ids, mask)
        plain = module.lm_forward(merged.eval(), ids, mask)
    torch.testing.assert_close(plain, adapted, atol=1e-4, rtol=1e-4)
    assert isinstance(module.policy, peft.PeftModel)  # exporting did not merge the live model


@pytest.mark.parametrize("method", ["dpo", "ppo"])
def test_adapters_from_the_cli(method, in_tmp, single_thread):
    # PPO here also runs the static-cache rollout engine on a peft-wrapped policy, reusing its log-probs
    length = ["--model.init_args.max_iterations=2", "--model.init_args.rollout_engine=static",
              "--model.init_args.reuse_rollout_logprobs=true"] if method == "ppo" else ["--trainer.max_steps=2"]
    cli = main(["fit", "-c", str(REPO / "configs" / method / "tiny.yaml"), "--model.init_args.lora_r=8",
                "--trainer.limit_val_batches=0", *length])
    module = cli.model
    assert module.iteration == 2 and (Path(module.resolved_export_dir()) / "adapter").is_dir()
    assert isinstance(module.policy, peft.PeftModel) and not isinstance(module.reference, peft.PeftModel)
    assert all(not p.requires_grad for p in module.reference.parameters())
    trained = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)  # (PPO's separate critic trains all its weights)


def test_unsupported_settings_fail_at_start():
    with pytest.raises(ValueError, match="RewardModelModule does not support LoRA"):
        RewardModelModule(lora_r=4)
    with pytest.raises(ValueError, match="lora_r must be >= 0"):
        SFTModule(lora_r=-1)
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="LoRA adapters.*not supported with sharded"):
        DPOModule(lora_r=4, export_dir=None).check_strategy(FSDPStrategy(), batch_size=8)
