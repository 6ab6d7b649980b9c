"""Print every scalar of every TensorBoard event file under a folder as ``run tag step value`` lines (sorted),
leaving out wall-clock metrics (``time/``, ``tokens_per_s/``) and ``epoch``: two runs of the same code and seeds on
one machine print the same lines, so ``diff`` of two dumps is a regression check across commits.

    python scripts/tb_scalars.py runs/before > before.txt
"""

from __future__ import annotations

import glob
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SKIP = ("time/", "tokens_per_s/", "epoch")


def main(root: str) -> None:
    for path in sorted(glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        run = os.path.relpath(os.path.dirname(path), root).split("/version_")[0]
        for tag in sorted(acc.Tags()["scalars"]):
            if tag.startswith(SKIP):
                continue
            for event in acc.Scalars(tag):
                print(f"{run} {tag} {event.step} {event.value:.9g}")


if __name__ == "__main__":
    main(sys.argv[1])
