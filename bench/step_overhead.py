"""The fixed per-step cost of a reward-model training step: where the time of a step on a tiny batch goes.

Trains ``RewardModelModule`` (built-in tiny Llama, fp32) under a ``lightning.Trainer`` on one pair of 8 tokens, so
the forward and backward passes cost almost nothing and what is left is the per-step machinery. The parts are timed
by wrapping the functions that do them (``time.perf_counter`` around each call, medians after 3 warm-up steps):

* ``step``: batch start to batch end (``callbacks/run_summary.py``'s ``RunSummary``, as in ``train_throughput.py``);
* ``training_step``: our method's step; ``preference_backward``: forward + backward;
* ``optimizer_update``: our check / clip / step / zero-grad / scheduler step, with inside it ``AdamW.step`` (the
  torch kernel), ``clip_grad_norm_``, ``_nonfinite_decision`` (the NaN/inf check and its one ``.item()``),
  ``zero_grad`` and the LR scheduler's ``step``.

    OMP_NUM_THREADS=1 python bench/step_overhead.py               # torch's default AdamW
    OMP_NUM_THREADS=1 python bench/step_overhead.py --fused-adamw # model.fused_adamw
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=203)
    p.add_argument("--fused-adamw", action="store_true")
    args = p.parse_args()

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from callbacks.run_summary import RunSummary
    from lightning_rlhf.data.batches import PreferenceBatch
    from lightning_rlhf.methods import RewardModelModule

    L.seed_everything(0, verbose=False)
    module = RewardModelModule(export_dir=None, lr=1e-5, max_grad_norm=1.0, fused_adamw=args.fused_adamw)
    ids = torch.randint(5, 100, (2, 8))
    batch = PreferenceBatch(ids, torch.ones_like(ids), torch.ones_like(ids), torch.zeros(1, dtype=torch.long),
                            index=torch.arange(1))
    times: dict[str, list[float]] = {}

    def timed(owner: Any, name: str, key: str) -> None:
        inner = getattr(owner, name)
        times[key] = []

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*a, **k)
            times[key].append(time.perf_counter() - t0)
            return out

        setattr(owner, name, wrapper)

    for name in ("training_step", "preference_backward", "optimizer_update", "_nonfinite_decision"):
        timed(module, name, name)
    timed(torch.optim.AdamW, "step", "AdamW.step")
    timed(torch.optim.AdamW, "zero_grad", "zero_grad")
    timed(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_")
    timed(torch.optim.lr_scheduler.LambdaLR, "step", "scheduler.step")
    summary = RunSummary(warmup_steps=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[summary])
    trainer.fit(module, train_dataloaders=DataLoader([batch] * args.steps, batch_size=None, collate_fn=lambda b: b))
    times = {"step": list(summary.step_times), **times}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# RewardModelModule, builtin:tiny-llama, fp32, 1 pair x 8 tokens, {args.steps} steps, "
          f"AdamW {'fused' if args.fused_adamw else 'torch default'}, {torch.get_num_threads()} torch threads, "
          f"load average {load}")
    for key, values in times.items():
        print(f"{key:<22} {1000 * statistics.median(values[3:]):7.3f} ms")


if __name__ == "__main__":
    main()
