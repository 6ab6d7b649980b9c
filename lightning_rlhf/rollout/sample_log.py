"""A few rollouts as a markdown table, for TensorBoard's text tab and the console log."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def _cell(text: str, limit: int = 300) -> str:
    text = text[-limit:] if len(text) > limit else text
    return text.replace("|", "\\|").replace("\n", "<br>")


def sample_table(prompts: Sequence[str], responses: Sequence[str], scores: Sequence[float],
                 shaped: Sequence[float]) -> str:
    """Markdown table ``| prompt | response | score | shaped |`` (the last 300 characters of each text)."""
    rows = ["| prompt | response | score | shaped |", "|---|---|---|---|"]
    for p, r, s, sh in zip(prompts, responses, scores, shaped):
        rows.append(f"| {_cell(p)} | {_cell(r)} | {float(s):.3f} | {float(sh):.3f} |")
    return "\n".join(rows)


def log_sample_table(loggers: Sequence[Any], table: str, step: int, tag: str = "rollout/samples") -> None:
    """Write ``table`` to every TensorBoard logger (``add_text``) and to the console log at INFO."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, table, global_step=step)
    log.info("iteration %d samples:\n%s", step, table)
