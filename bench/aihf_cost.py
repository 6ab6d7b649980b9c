"""Cost of one AIHF-DPO / Self-Play AIHF training step by phase, beside DPO's at the same batch.

Every method gets the same ``--batch`` preference pairs; the AIHF variants also get ``--batch`` demonstrations (a
demonstration stream of the same size). Phases (logged by ``AIHFDPOModule`` as ``time/sample`` and
``time/policy_step``):

* ``sample``: Self-Play AIHF draws one response per demonstration prompt from the opponent snapshot, in one batched
  call of the rollout engine (``--engine static``: ``lightning_rlhf/rollout/engine.py``; ``hf``: ``model.generate``);
* ``policy step``: the DPO term, the demonstration term (``spin``: policy and opponent forwards on ``y_E`` and ``y~``;
  ``nll``: one policy forward on ``y_E``) and the optimizer step.

A second table compares the explicit-reward ``AIHFModule`` with PPO at the same prompt batch (PPO against the same
reward model, frozen): one PPO iteration (rollout sampling ``generate``, scoring forwards ``score``, the PPO
``update``) plus, for AIHF, the reward phase (sampling on the demonstration prompts, the reward model's step).

Each configuration runs ``--steps`` steps of a real Trainer on a fixed batch; the first is dropped (warm-up) and the
median of the rest is printed.

    python bench/aihf_cost.py                       # builtin:tiny-llama, CPU
    python bench/aihf_cost.py --model HuggingFaceTB/SmolLM2-135M --batch 8 --max-new-tokens 64 --steps 4
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule  # noqa: E402
from lightning_rlhf.methods import AIHFModule, DPOModule, PPOModule  # noqa: E402
from lightning_rlhf.methods.aihf_dpo import AIHFDPOModule  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of every training step and the module's logged phase times."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.phases: dict[str, list[float]] = {k: [] for k in ("time/sample", "time/policy_step", "time/generate",
                                                                 "time/score", "time/update", "time/reward_sample",
                                                                 "time/reward_step")}
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._t)
        for key in self.phases:
            if key in trainer.callback_metrics:
                self.phases[key].append(float(trainer.callback_metrics[key]))


def fixed_batches(model: str, n: int, max_length: int, max_prompt_length: int) -> dict:
    """``n`` pairs and ``n`` demonstrations of the embedded HH data, tokenised for ``model``."""
    from lightning_rlhf.models.factory import load_tokenizer

    tok = load_tokenizer(model)
    out = {}
    for name, cls in (("preferences", PreferenceDataModule), ("demonstrations", DemonstrationDataModule),
                      ("prompts", PromptDataModule)):
        kw = {} if name == "prompts" else {"max_length": max_length}
        dm = cls(max_train_rows=n, batch_size=n, max_prompt_length=max_prompt_length, skip_invalid_rows=True, seed=0,
                 **kw)
        dm.set_tokenizer(tok)
        dm.setup("fit")
        out[name] = dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])
    return out


def run(module: L.LightningModule, batch, steps: int) -> StepTimer:
    timer = StepTimer()
    loader = DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer], log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader)
    return timer


def med(values: list[float]) -> float:
    values = values[1:] if len(values) > 1 else values  # drop the warm-up step
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--batch", type=int, default=8, help="preference pairs (and demonstrations) per step")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=192)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--engine", default="static", choices=["static", "hf"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch", "lightning_rlhf", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    batches = fixed_batches(args.model, args.batch, args.max_length, args.max_prompt_length)
    common = dict(model_name_or_path=args.model, export_dir=None, lr=1e-5, beta=0.1)
    configs = [
        ("DPO", lambda: DPOModule(**common), batches["preferences"]),
        ("AIHF-DPO nll", lambda: AIHFDPOModule(demo_term="nll", **common), batches),
        ("Self-Play AIHF (spin)", lambda: AIHFDPOModule(demo_term="spin", max_new_tokens=args.max_new_tokens,
                                                        rollout_engine=args.engine, round_steps=1000, **common),
         batches),
    ]
    print(f"model {args.model}, {args.batch} pairs (+ {args.batch} demonstrations for AIHF), "
          f"max_new_tokens {args.max_new_tokens}, engine {args.engine}, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps - 1} steps after 1 warm-up")
    print(f"{'method':<24} {'step s':>8} {'sample s':>9} {'policy step s':>14} {'x DPO':>6}")
    base = None
    for name, make, batch in configs:
        torch.manual_seed(0)
        timer = run(make(), batch, args.steps)
        step = med(timer.steps)
        base = base or step
        sample = f"{med(timer.phases['time/sample']):9.3f}" if "spin" in name else f"{'-':>9}"
        policy = med(timer.phases["time/policy_step"]) if timer.phases["time/policy_step"] else step
        print(f"{name:<24} {step:8.3f} {sample} {policy:14.3f} {step / base:6.2f}", flush=True)

    # explicit reward: PPO vs AIHFModule (one iteration = one training step)
    rl = dict(model_name_or_path=args.model, reward_model_name_or_path=args.model, export_dir=None, lr=1e-5,
              critic_lr=1e-5, max_new_tokens=args.max_new_tokens, rollout_engine=args.engine, ppo_epochs=1,
              log_samples_every_n=0, max_iterations=args.steps)
    print(f"\n{args.batch} prompts per PPO iteration (+ {args.batch} pairs and {args.batch} demonstrations for AIHF)")
    print(f"{'method':<24} {'iter s':>8} {'generate':>9} {'score':>7} {'update':>7} {'rm sample':>10} "
          f"{'rm step':>8} {'x PPO':>6}")
    base = None
    for name, make, batch in (("PPO", lambda: PPOModule(**rl), batches["prompts"]),
                              ("AIHF (explicit reward)", lambda: AIHFModule(reward_lr=1e-5, **rl), batches)):
        torch.manual_seed(0)
        timer = run(make(), batch, args.steps)
        step = med(timer.steps)
        base = base or step
        cols = [med(timer.phases[k]) for k in ("time/generate", "time/score", "time/update")]
        rm = [f"{med(timer.phases[k]):10.3f}" if timer.phases[k] else f"{'-':>10}" for k in ("time/reward_sample",)]
        rm += [f"{med(timer.phases['time/reward_step']):8.3f}" if timer.phases["time/reward_step"] else f"{'-':>8}"]
        print(f"{name:<24} {step:8.3f} {cols[0]:9.3f} {cols[1]:7.3f} {cols[2]:7.3f} {rm[0]} {rm[1]} {step / base:6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
