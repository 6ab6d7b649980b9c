"""Protocols a LightningModule implements so that the callbacks in this folder can talk to it.

Callbacks import only ``lightning``, ``torch`` and the standard library; they never import ``lightning_rlhf``.
A module opts in by providing the members below (structural typing: no base class needed), and a callback
checks ``isinstance(pl_module, Protocol)`` in ``setup`` and raises a ``TypeError`` naming what is missing.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable


@runtime_checkable
class KLControlled(Protocol):
    """A module with a scalar KL coefficient that a controller may adapt (e.g. PPO's ``beta``).

    Attributes:
        kl_coef: the KL coefficient used in the next rollout's token rewards; settable.
    """

    kl_coef: float

    def last_rollout_stats(self) -> Mapping[str, float]:
        """Statistics of the rollouts since the previous call, ALREADY averaged across ranks.

        The same values must be returned on every rank (so ranks that adapt a coefficient stay identical).
        Calling it consumes the statistics: the next call only reports newer rollouts, and an empty mapping (or
        ``num_sequences == 0``) means there was no rollout since the last call.

        Returns:
            A mapping with at least:

            - ``kl_seq_sum``: mean over sequences of the sum over response tokens of ``kl_t``;
            - ``kl_token_mean``: mean of ``kl_t`` over all response tokens;
            - ``num_sequences``: number of sequences, summed over ranks, since the last call.
        """
        ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """Names of the members of ``protocol`` that ``obj`` lacks (for error messages).

    Args:
        obj: the object to check (usually the LightningModule).
        protocol: a ``typing.Protocol`` class.

    Returns:
        Sorted member names; empty when ``obj`` implements the protocol.
    """
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return sorted(n for n in names if not hasattr(obj, n))
