"""DDP correctness on CPU: 2 processes (gloo) with half the batch each give the same parameters as 1 process with the
whole batch, because the sampler's global order does not depend on the number of ranks and the losses are divided by
the local batch size (DDP's gradient average over equal halves is then the full-batch gradient)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_rlhf.cli import main
from lightning_rlhf.data.resumable import ResumableSampler
from lightning_rlhf.models.factory import resolve_pretrained
from lightning_rlhf.rollout.generation import GenerationOutput, truncate_at_eos
from tests.distributed import run_distributed

REPO = Path(__file__).resolve().parent.parent
STEPS = 3
GLOBAL_BATCH = 8
# small and short: 32 rows, sequences cut to 128 tokens, no validation, no checkpoints
COMMON = [
    f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
    "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--data.max_train_rows=32", "--data.max_length=128", "--data.max_prompt_length=96", "--data.skip_invalid_rows=true",
]


def subprocess_env() -> dict[str, str]:
    """Environment of a CLI subprocess: this process's thread count (bit-identical CPU math) and the repo on the path."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def assert_same_training(single: dict, ddp: dict, init: dict, lr: float) -> None:
    """Same parameters up to float rounding. Adam divides by sqrt(v): on an element whose gradient is near zero the
    rounding of DDP's all-reduced mean can move one update by a visible fraction of ``lr``, so each tensor's update
    is compared as a whole (relative L2 distance) and single elements only against ``lr``."""
    assert single.keys() == ddp.keys()
    moved = [k for k in single if k in init and not torch.equal(single[k], init[k])]
    assert moved, "training did not change the parameters"
    for k in moved:
        d_single, d_ddp = single[k].double() - init[k].double(), ddp[k].double() - init[k].double()
        rel = ((d_ddp - d_single).norm() / d_single.norm().clamp_min(1e-12)).item()
        assert rel < 1e-2, f"{k}: updates differ by {rel:.2e} (relative L2)"
        assert (d_ddp - d_single).abs().max().item() < lr, k


def test_sampler_global_order_does_not_depend_on_the_number_of_ranks():
    n, b = 37, 4
    one = list(ResumableSampler(range(n), num_replicas=1, rank=0, seed=5))
    ranks = [list(ResumableSampler(range(n), num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    for i in range(n // (2 * b)):  # full global batches
        union = sorted(ranks[0][i * b : (i + 1) * b] + ranks[1][i * b : (i + 1) * b])
        assert union == sorted(one[i * 2 * b : (i + 1) * 2 * b])
    assert len(ranks[0]) == len(ranks[1]) == 19  # padded so that both ranks run the same number of steps
    s = ResumableSampler(range(n), seed=5)
    s.set_epoch(1)
    assert sorted(s) == list(range(n)) and list(s) != one  # a new permutation every epoch


# each case is ~20 s in process + ~30 s for the 2-process run (on a busy 2-core machine): RM and SFT run with -m slow.
# SFT divides by the tokens of all ranks (mean_over_ranks), so unequal token counts per rank do not break it.
@pytest.mark.parametrize("method", ["dpo", "rm", "sft"])
def test_two_ddp_processes_match_one_process_with_the_whole_batch(method, in_tmp):
    config = str(REPO / "configs" / method / "tiny.yaml")
    # 1 process, global batch
    cli = main(["fit", "-c", config, *COMMON, f"--data.batch_size={GLOBAL_BATCH}",
                f"--model.export_dir={in_tmp / 'single'}"])
    # 2 processes (gloo), half the batch each
    cmd = [
        sys.executable, str(REPO / "cli.py"), "fit", "-c", config, *COMMON,
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        f"--data.batch_size={GLOBAL_BATCH // 2}", f"--model.export_dir={in_tmp / 'ddp'}",
    ]
    proc = run_distributed(cmd, cwd=in_tmp, env=subprocess_env(), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Starting with 2 processes" in out, out[-4000:]

    single = load_file(str(in_tmp / "single" / "model.safetensors"))
    ddp = load_file(str(in_tmp / "ddp" / "model.safetensors"))
    init = load_file(str(Path(resolve_pretrained("builtin:tiny-llama")) / "model.safetensors"))
    assert_same_training(single, ddp, init, lr=float(cli.model.lr))


# ---------------------------------------------------------------------------------------------- PPO
class FixedResponses:
    """A deterministic stand-in for sampling: each prompt's response is its last real tokens reversed, cut by an
    EOS at a prompt-dependent position (so responses, and the ranks' token counts, have different lengths)."""

    def __init__(self, eos_token_id: int, pad_token_id: int, max_new_tokens: int = 8, group_size: int = 1) -> None:
        self.eos, self.pad, self.R, self.k = eos_token_id, pad_token_id, max_new_tokens, group_size

    def generate(self, model, input_ids, attention_mask, seed=None) -> GenerationOutput:
        rows = []
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            real = ids[mask.bool()]
            resp = torch.full((self.R,), 5, dtype=ids.dtype)
            tail = real.flip(0)[: self.R]
            resp[: len(tail)] = tail
            # sample j of a prompt's group (rows b*k + j) ends elsewhere: the samples of a group differ
            stop = 2 + (int(real.sum()) + 3 * (row % self.k)) % (self.R - 1)  # 2..R: R means no EOS
            if stop < self.R:
                resp[stop] = self.eos
            rows.append(resp)
        responses, action_mask, stopped = truncate_at_eos(torch.stack(rows), self.eos, self.pad)
        return GenerationOutput(
            sequences=torch.cat([input_ids, responses.to(input_ids.device)], 1),
            attention_mask=torch.cat([attention_mask, action_mask.to(attention_mask.device)], 1),
            action_mask=action_mask.to(input_ids.device), prompt_length=input_ids.shape[1], stopped_by_eos=stopped,
        )


#: the critic-free variant: GRPO with batch-std scaling (a cross-rank statistic), the k3 KL as a loss term and
#: per-sequence token means (cross-rank sequence counts), 2 samples per prompt
GRPO = dict(critic="none", advantage="grpo", n_samples_per_prompt=2, scale_rewards="batch", kl_in="loss",
            kl_loss_coef=0.1, loss_agg="seq_mean_token_mean")


def run_fixed_experience_ppo(out: str, devices: int, batch_size: int, variant: str = "ppo") -> None:
    """Two PPO iterations on fixed responses (per-rank batch ``batch_size``): whole-batch minibatches, 2 epochs,
    micro-batches of 2, adaptive KL; saves trainable parameters and the cross-rank statistics to ``out``.
    ``variant``: ``ppo`` (separate critic, GAE) or ``grpo`` (:data:`GRPO`)."""
    from callbacks.adaptive_kl import AdaptiveKLController
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.methods.ppo import PPOModule

    L.seed_everything(0)
    options = GRPO if variant == "grpo" else {"critic": "separate"}
    module = PPOModule(
        model_name_or_path="builtin:tiny-llama", lr=1e-3, critic_lr=1e-3, kl_coef=0.05,
        reward_fn={"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}},
        ppo_epochs=2, mini_batch_size=None, micro_batch_size=2, max_new_tokens=8, reward_norm="norm",
        max_iterations=2, log_samples_every_n=0, export_dir=None, **options,
    )
    module.generator = FixedResponses(module.tokenizer.eos_token_id, module.tokenizer.pad_token_id,
                                      group_size=module.n_samples_per_prompt)
    module.configure_model()
    init = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    data = PromptDataModule(train_path="builtin:hh-rlhf", batch_size=batch_size, max_prompt_length=48,
                            skip_invalid_rows=True, max_train_rows=32, max_val_rows=4)
    ctl = AdaptiveKLController(target=0.5, horizon=100)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=-1, logger=False,
        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ctl],
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        stats = {"reward_mean": float(module.reward_mean), "reward_var": float(module.reward_var),
                 "reward_count": float(module.reward_count), "kl_coef": module.kl_coef,
                 "total_sequences": ctl.total_sequences, "last_kl": ctl.last_kl, "world_size": trainer.world_size}
        torch.save({"params": params, "init": init, "stats": stats}, out)


@pytest.mark.parametrize("variant", ["ppo", "grpo"])
def test_ppo_iterations_on_fixed_responses_match_between_two_ranks_and_one(in_tmp, variant):
    """Same prompts, same (fixed) responses: the scoring, the cross-rank statistics (reward moments, advantage
    whitening or GRPO's batch std, the KL the controller reads, token / sequence counts of the loss) and the update
    give 2 ranks x 4 prompts the parameters of 1 x 8. A prompt's group of samples never spans two ranks."""
    run_fixed_experience_ppo(str(in_tmp / "single.pt"), devices=1, batch_size=8, variant=variant)
    proc = run_distributed([sys.executable, "-m", "tests.test_ddp", str(in_tmp / "ddp.pt"), "2", "4", variant],
                           cwd=in_tmp, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    single, ddp = torch.load(in_tmp / "single.pt"), torch.load(in_tmp / "ddp.pt")
    assert ddp["stats"]["world_size"] == 2 and single["stats"]["world_size"] == 1
    for key in ("reward_mean", "reward_var", "reward_count", "kl_coef", "total_sequences", "last_kl"):
        assert ddp["stats"][key] == pytest.approx(single["stats"][key], rel=1e-5, abs=1e-7), key
    for n in single["init"]:
        assert torch.equal(single["init"][n], ddp["init"][n]), n  # same start (the critic head is seeded)
    assert_same_training(single["params"], ddp["params"], single["init"], lr=1e-3)


if __name__ == "__main__":  # the 2-process half of the PPO test (Lightning relaunches this module for rank 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_fixed_experience_ppo(sys.argv[1], devices=int(sys.argv[2]), batch_size=int(sys.argv[3]), variant=sys.argv[4])
