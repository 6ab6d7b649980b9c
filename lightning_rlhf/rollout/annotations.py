"""The registry behind ``callbacks.protocols.ExperienceAnnotatable``: experience hooks and the per-iteration view.

A module keeps one :class:`ExperienceHooks`; callbacks register hooks on it through the module's
``register_experience_hook``. Once per iteration the module builds the view (per-sample tensors of all ranks, in rank
order, identical on every rank) and calls :meth:`ExperienceHooks.run`, which calls every hook in registration order
and folds what it returns into the view: ``kl_scale`` and ``sample_weight`` multiply across hooks, any other key is
stored as it is. The module then takes its own rank's rows of the result.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

import torch

from callbacks.protocols import KL_SCALE, SAMPLE_WEIGHT, ExperienceHook

#: annotation keys that several hooks may return: their values multiply
MULTIPLICATIVE_KEYS = (KL_SCALE, SAMPLE_WEIGHT)


class ExperienceHooks:
    """Registered experience hooks, in registration order."""

    def __init__(self) -> None:
        self._hooks: dict[str, tuple[ExperienceHook, bool]] = {}

    def register(self, name: str, hook: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]],
                 needs_features: bool = False) -> None:
        """Add ``hook`` under ``name``; a name registered again replaces its hook in the same place."""
        if not callable(hook):
            raise TypeError(f"register_experience_hook({name!r}): the hook must be callable, got {type(hook).__name__}")
        self._hooks[name] = (hook, bool(needs_features))

    def __len__(self) -> int:
        return len(self._hooks)

    @property
    def names(self) -> list[str]:
        """Registered hook names in call order."""
        return list(self._hooks)

    @property
    def needs_features(self) -> bool:
        """Whether any hook asked for ``features`` in the view."""
        return any(needs for _, needs in self._hooks.values())

    def run(self, view: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Call every hook on the view (read-only to the hook) and fold its annotations into ``view``.

        Args:
            view: per-sample tensors of all ranks (first dimension ``N``), updated in place.

        Returns:
            The annotations of all hooks together (``kl_scale`` / ``sample_weight`` multiplied across hooks).

        Raises:
            ValueError: a hook returned something that is not a tensor with first dimension ``N``.
        """
        n = int(view["scores"].shape[0])
        annotations: dict[str, torch.Tensor] = {}
        for name, (hook, _) in self._hooks.items():
            out = hook(MappingProxyType(view))
            for key, value in (out or {}).items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != n:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"experience hook {name!r} returned {key!r} of shape {shape}; every annotation "
                                     f"must be a tensor with one row per rollout of all ranks ({n})")
                value = value.detach().to(view["scores"].device)
                if key in MULTIPLICATIVE_KEYS:
                    value = value.float()
                    if key in annotations:
                        value = annotations[key] * value
                annotations[key] = value
                view[key] = value
        return annotations
