"""Save the random number generators' states in checkpoints and put them back on resume.

Lightning restores the model, optimizers and loop counters, not the RNGs: a resumed run would draw different dropout
masks, samples and shuffles than the run it continues. This callback stores, for every rank, the states of Python's
``random``, of NumPy's global generator (when NumPy is installed) and of torch's CPU and CUDA generators, and restores
this rank's states when training starts again (``on_train_start``, after everything that runs between the restore and
the first step has run), so that the resumed run continues with exactly the numbers the interrupted run would have
drawn next.

Every state is stored as plain Python numbers, lists and ``torch.uint8`` tensors, so checkpoints still load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

try:  # NumPy is optional
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with torch in practice
    np = None  # type: ignore[assignment]


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as weights_only-safe values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back states captured by :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("Not restoring CUDA RNG states: saved for %d devices, %d visible.", len(cuda),
                        torch.cuda.device_count())
    if "numpy" in state and np is not None:
        s = state["numpy"]
        np.random.set_state(
            (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )


class RNGStateCallback(L.Callback):
    """Checkpoints every rank's Python / NumPy / torch (CPU and CUDA) RNG states and restores them on resume.

    With several ranks the states of all ranks are gathered into the checkpoint (``state_dict`` runs on every rank
    when a checkpoint is written); a run resumed with a different number of ranks uses ``states[rank % saved]``.
    """

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        local = capture_rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, local)
            return {"ranks": states}
        return {"ranks": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_train_start: the restore happens before the strategy, optimizers and data loaders are set up,
        # and that set-up may draw random numbers
        self._to_restore = list(state_dict.get("ranks") or []) or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore, None
        if len(states) != trainer.world_size:
            log.warning(
                "RNG states were saved by %d ranks and are restored on %d: rank r uses saved state r mod %d.",
                len(states), trainer.world_size, len(states),
            )
        restore_rng_state(states[trainer.global_rank % len(states)])
