"""Reward-model forward + backward, padded vs padding-free vs TRL's call, interleaved batch by batch.

``train_throughput.py`` runs each side in its own process one after the other, so on a CPU shared with other jobs a
change of load between two workers moves their ratio. This script measures the part of a reward-model step that
packing changes, in one process, with the three arms taking turns on every batch (so load changes hit them alike):

* ``padded``: ``RewardModelModule.score_sequences`` on the padded batch (``padding_free: false``);
* ``padding-free``: the same module with ``padding_free: true`` (packed rows, ``lightning_rlhf/packing.py``);
* ``hf (TRL's call)``: ``AutoModelForSequenceClassification(input_ids, attention_mask).logits``, what TRL 1.16's
  ``RewardTrainer.compute_loss`` calls on its padded batch (same weights, same batch);

each followed by the Bradley-Terry loss and its backward. Batches: 8 pairs of the same token ids as
``train_throughput.py`` (``fixed``: 64 + 64 random tokens; ``real``: HH-RLHF rows that fit in 256 tokens). Reported:
the median process CPU time (``time.process_time``) and wall time per batch.

    OMP_NUM_THREADS=1 python bench/packing_ab.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    import torch.nn.functional as F

    import train_throughput as tt
    from lightning_rlhf.data import PreferenceDataModule
    from lightning_rlhf.methods import RewardModelModule

    modules = []
    for padding_free in (False, True):
        torch.manual_seed(0)
        module = RewardModelModule(export_dir=None, padding_free=padding_free)
        module.configure_model()
        modules.append(module)
    tok = modules[0].tokenizer
    hf = modules[0].reward_model.hf_model
    dm = PreferenceDataModule(max_length=256, max_prompt_length=255, batch_size=8)
    dm.set_tokenizer(tok)

    def bt(scores: torch.Tensor) -> torch.Tensor:
        B = scores.shape[0] // 2
        return -F.logsigmoid(scores[:B] - scores[B:]).mean()

    arms = {
        "padded": lambda b: bt(modules[0].score_sequences(b.input_ids, b.attention_mask)),
        "padding-free": lambda b: bt(modules[1].score_sequences(b.input_ids, b.attention_mask)),
        "hf (TRL's call)": lambda b: bt(hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, 0]),
    }
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} | {tt.machine('cpu')} | {torch.get_num_threads()} torch threads | "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for kind in ("fixed", "real"):
        rows = (tt.fixed_rows(tok, 4096, 64, 64, 64, 0) if kind == "fixed"
                else tt.real_rows(tok, "builtin:hh-rlhf", None, 256, 64, 0))
        items = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
                  "chosen_prompt_len": len(r["prompt_ids"]), "rejected_prompt_len": len(r["prompt_ids"]),
                  "domain_id": 0, "index": i} for i, r in enumerate(rows)]
        batches = [dm.collate(items[s : s + 8]) for s in range(0, len(items), 8)]
        real = sum(int(b.attention_mask.sum()) for b in batches) / sum(b.attention_mask.numel() for b in batches)
        cpu: dict[str, list[float]] = {k: [] for k in arms}
        wall: dict[str, list[float]] = {k: [] for k in arms}
        for rep in range(4):
            for b in batches:
                for name, arm in arms.items():
                    c0, w0 = time.process_time(), time.perf_counter()
                    arm(b).backward()
                    if rep:  # the first pass warms up
                        cpu[name].append(time.process_time() - c0)
                        wall[name].append(time.perf_counter() - w0)
        base = statistics.median(cpu["hf (TRL's call)"])
        print(f"{kind}: 8 pairs per batch, {real:.0%} of the padded batch is real tokens")
        for name in arms:
            c = statistics.median(cpu[name])
            print(f"  {name:<16} CPU {1000 * c:6.1f} ms  wall {1000 * statistics.median(wall[name]):6.1f} ms  "
                  f"TRL's call / this (CPU): {base / c:.2f}")


if __name__ == "__main__":
    main()
