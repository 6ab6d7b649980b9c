"""Contrastive rewards (spec 4, Shen et al., arXiv 2403.07708): pure helpers, no Lightning.

* :func:`aggregate_scores`: ``b(x) = agg_j r(x, y_j)`` over the ``k`` baseline scores of one prompt
  (``mean`` | ``median`` | ``max`` | ``quantile``).
* :func:`prompt_seed` / :func:`sample_seed` (from :mod:`lightning_rlhf.sample_sets`): the sampling seeds of one
  prompt, from the base seed and the stable prompt id, so the ``k`` baseline samples of a prompt do not depend on
  batch composition, ranks or resumption.
* The baseline file (``.jsonl``, or ``.parquet`` by extension): one record per prompt, sorted by ``prompt_id``::

      {"prompt_id": "0a1b...", "baseline": 6.5, "count": 4, "scores": [5.0, 7.0, 6.0, 8.0], "agg": "mean"}

  :func:`write_baseline_file` writes it atomically; :func:`read_baselines` validates it (errors name file and line).
* Part files (the resumable journal of the offline pass) are those of the policy-samples pass
  (:mod:`lightning_rlhf.sample_sets`: :func:`append_records`, :func:`read_part_file`, :func:`repair_part_file`,
  re-exported here): the baseline pass is a policy-samples pass whose merge aggregates the scores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_rlhf.sample_sets import SampleSetFileError, append_records, prompt_seed, read_part_file
from lightning_rlhf.sample_sets import repair_part_file, sample_seed, write_sorted_records
from lightning_rlhf.sample_sets import is_number as _is_number
from lightning_rlhf.sample_sets import parse_json_line as _parse_json_line

__all__ = [
    "AGGREGATIONS", "BaselineFileError", "aggregate_scores", "append_records", "baseline_record", "prompt_seed",
    "quantile", "read_baselines", "read_part_file", "repair_part_file", "sample_seed", "write_baseline_file",
]

Aggregation = Literal["mean", "median", "max", "quantile"]
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "max", "quantile")


#: A baseline or part file is unusable; the message names the file and the line (or row). The same class as
#: :class:`~lightning_rlhf.sample_sets.SampleSetFileError` (a ``ValueError``), since both files share the part files.
BaselineFileError = SampleSetFileError


# ---------------------------------------------------------------------------------------------------- aggregation
def quantile(scores: Sequence[float], q: float) -> float:
    """The ``q``-quantile with linear interpolation between order statistics (numpy's default ``linear`` method).

    Args:
        scores: ``k >= 1`` finite numbers.
        q: in ``[0, 1]``.

    Returns:
        ``s[lo] + (s[hi] - s[lo]) * (pos - lo)`` with ``s`` sorted, ``pos = q * (k - 1)``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    s = sorted(float(x) for x in scores)
    if not s:
        raise ValueError("quantile of an empty list")
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def aggregate_scores(scores: Sequence[float], agg: Aggregation = "mean", q: float = 0.5) -> float:
    """Baseline ``b(x)`` of one prompt from the scores of its ``k`` sampled responses.

    Args:
        scores: the ``k >= 1`` reward scores of one prompt.
        agg: ``mean`` (exactly rounded sum / k), ``median`` (mean of the two middle values for even ``k``),
            ``max``, or ``quantile`` (linear interpolation, see :func:`quantile`).
        q: the quantile for ``agg="quantile"``.

    Returns:
        The baseline as a Python float.
    """
    values = [float(x) for x in scores]
    if not values:
        raise ValueError("cannot aggregate an empty list of scores")
    if agg == "mean":
        return math.fsum(values) / len(values)
    if agg == "median":
        return quantile(values, 0.5)
    if agg == "max":
        return max(values)
    if agg == "quantile":
        return quantile(values, q)
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


# ---------------------------------------------------------------------------------------------------- records
def baseline_record(
    prompt_id: str, scores: Sequence[float], agg: Aggregation = "mean", q: float = 0.5
) -> dict[str, Any]:
    """One line of the baseline file (keys in file order; ``quantile_q`` only for ``agg="quantile"``)."""
    values = [float(x) for x in scores]
    record: dict[str, Any] = {
        "prompt_id": prompt_id, "baseline": aggregate_scores(values, agg, q), "count": len(values),
        "scores": values, "agg": agg,
    }
    if agg == "quantile":
        record["quantile_q"] = float(q)
    return record


def _baseline_table(rows: list[Mapping[str, Any]]) -> Any:
    import pyarrow as pa

    columns = ("prompt_id", "baseline", "count", "scores", "agg")
    table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in columns})
    if any("quantile_q" in r for r in rows):
        table = table.append_column("quantile_q", pa.array([r.get("quantile_q") for r in rows], pa.float64()))
    return table


def write_baseline_file(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write baseline records sorted by ``prompt_id`` to ``path`` atomically; ``.parquet`` writes a parquet table
    (needs ``pyarrow``), anything else JSON lines. Returns the path written."""
    return write_sorted_records(path, records, _baseline_table)


def _check_record(obj: Any, where: str) -> tuple[str, float]:
    if not isinstance(obj, dict):
        raise BaselineFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    pid = obj.get("prompt_id")
    if not isinstance(pid, str) or not pid:
        raise BaselineFileError(f"{where}: missing or non-string 'prompt_id' (got {pid!r})")
    if "baseline" not in obj:
        raise BaselineFileError(f"{where}: missing 'baseline' for prompt_id {pid!r}")
    b = obj["baseline"]
    if not _is_number(b):
        raise BaselineFileError(f"{where}: 'baseline' of prompt_id {pid!r} is not a number (got {b!r})")
    if not math.isfinite(float(b)):
        raise BaselineFileError(f"{where}: 'baseline' of prompt_id {pid!r} is not finite (got {b!r})")
    return pid, float(b)


def read_baselines(path: str | os.PathLike) -> dict[str, float]:
    """Load ``{prompt_id: baseline}`` from a baseline file, validating every record.

    Raises:
        FileNotFoundError: the file does not exist.
        BaselineFileError: bad JSON, a record without ``prompt_id`` / ``baseline``, a baseline that is not a finite
            number, or one prompt id with two different baselines; the message names the file and line (or row).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"baseline file {path} does not exist")
    out: dict[str, float] = {}
    first_seen: dict[str, str] = {}

    def add(obj: Any, where: str) -> None:
        pid, b = _check_record(obj, where)
        if pid in out and out[pid] != b:
            raise BaselineFileError(
                f"{where}: prompt_id {pid!r} has baseline {b!r} here but {out[pid]!r} at {first_seen[pid]}"
            )
        out[pid] = b
        first_seen.setdefault(pid, where)

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file
            raise BaselineFileError(f"{path}: unreadable parquet file ({e})") from None
        for i, row in enumerate(rows):
            add(row, f"{path}: row {i}")
        return out
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            add(_parse_json_line(line, where), where)
    return out
