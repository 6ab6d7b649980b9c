"""Contrastive rewards (spec 4, Shen et al., arXiv 2403.07708): pure helpers, no Lightning.

* :func:`aggregate_scores`: ``b(x) = agg_j r(x, y_j)`` over the ``k`` baseline scores of one prompt
  (``mean`` | ``median`` | ``max`` | ``quantile``).
* :func:`prompt_seed`: the sampling seed of one prompt, from the base seed and the stable prompt id, so the ``k``
  baseline samples of a prompt do not depend on batch composition, ranks or resumption.
* The baseline file (``.jsonl``, or ``.parquet`` by extension): one record per prompt, sorted by ``prompt_id``::

      {"prompt_id": "0a1b...", "baseline": 6.5, "count": 4, "scores": [5.0, 7.0, 6.0, 8.0], "agg": "mean"}

  :func:`write_baseline_file` writes it atomically; :func:`read_baselines` validates it (errors name file and line).
* Part files (the resumable journal of the offline pass): :func:`append_records` appends one JSON line per prompt and
  fsyncs; :func:`read_part_file` reads them back, ignoring a last line cut short by a kill;
  :func:`repair_part_file` drops such a tail before appending again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_rlhf.atomic import atomic_write_path

Aggregation = Literal["mean", "median", "max", "quantile"]
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "max", "quantile")


class BaselineFileError(ValueError):
    """A baseline or part file is unusable. The message names the file and the line (or row)."""


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


def prompt_seed(seed: int, prompt_id: str) -> int:
    """Sampling seed of one prompt: 62 bits of ``sha256(f"{seed}:{prompt_id}")``."""
    digest = hashlib.sha256(f"{int(seed)}:{prompt_id}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % (2**62)


def sample_seed(seed: int, prompt_id: str, j: int) -> int:
    """Counter-RNG seed of sample ``j`` of a prompt (static engine): :func:`prompt_seed` plus ``j`` golden-ratio
    steps, modulo ``2**62``."""
    return (prompt_seed(seed, prompt_id) + j * 0x9E3779B97F4A7C15) % (2**62)


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


def _dumps(record: Mapping[str, Any]) -> str:
    # allow_nan=False: a NaN/inf never reaches a file (the writer checks first and names the prompt)
    return json.dumps(record, allow_nan=False, ensure_ascii=False)


def write_baseline_file(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write records sorted by ``prompt_id`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    ``.parquet`` writes a parquet table (needs ``pyarrow``); anything else writes JSON lines.

    Returns:
        The path written.
    """
    path = Path(path)
    rows = sorted(records, key=lambda r: r["prompt_id"])
    with atomic_write_path(path, prefix=f".{path.name}.tmp-") as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = ("prompt_id", "baseline", "count", "scores", "agg")
            table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in columns})
            if any("quantile_q" in r for r in rows):
                table = table.append_column("quantile_q", pa.array([r.get("quantile_q") for r in rows], pa.float64()))
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(_dumps(r) + "\n" for r in rows)
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite literal {name}")


def _parse_json_line(line: str, where: str) -> Any:
    try:
        # reject the non-standard NaN / Infinity literals that Python's json accepts by default
        return json.loads(line, parse_constant=_reject_constant)
    except ValueError as e:
        raise BaselineFileError(f"{where}: invalid JSON ({e})") from None


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


# ---------------------------------------------------------------------------------------------------- part files
def append_records(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Append JSON lines to a part file and fsync, so a finished batch survives a kill."""
    if not records:
        return
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        f.write("".join(_dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_part_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a part file. A last line without its newline (a write cut by a kill) is ignored; a bad line
    anywhere else raises :class:`BaselineFileError` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    # the last element is "" (the file ends with a newline) or a record cut short by a kill: not finished, redone
    complete = text.split("\n")[:-1]
    records = []
    for lineno, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        obj = _parse_json_line(line, where)
        ok = isinstance(obj, dict) and isinstance(obj.get("prompt_id"), str) and isinstance(obj.get("scores"), list)
        if not ok:
            raise BaselineFileError(f"{where}: expected an object with 'prompt_id' and 'scores'")
        if not all(_is_number(s) and math.isfinite(s) for s in obj["scores"]):
            raise BaselineFileError(f"{where}: non-numeric or non-finite score for prompt_id {obj['prompt_id']!r}")
        records.append(obj)
    return records


def repair_part_file(path: str | os.PathLike) -> int:
    """Cut an incomplete last line (no trailing newline) off a part file. Returns the number of bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
    if keep == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep
