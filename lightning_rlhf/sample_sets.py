"""Sample sets: ``k`` policy responses per prompt, on disk. Pure helpers, no Lightning.

* The sample-set file (``.jsonl``, or ``.parquet`` by extension): one record per prompt, sorted by ``prompt_id``::

      {"prompt_id": "0a1b...", "prompt": "...", "responses": ["...", "..."], "scores": [1.0, 3.0], "domain": "hh"}

  ``scores`` (one per response, from the pass's reward source) is optional: all records have it or none does.
  Every record has the same number ``k`` of responses. :func:`write_sample_set_file` writes it atomically;
  :func:`read_sample_sets` validates it (errors name file, line or row, and field).
* Sampling seeds: :func:`prompt_seed` (all ``k`` samples of a prompt drawn together, ``rollout_engine: hf``) and
  :func:`sample_seed` (one counter-based seed per sample, ``rollout_engine: static``), hashed from the base seed and
  the stable prompt id, so a prompt's samples do not depend on batch composition, ranks or resumption.
* Part files (the resumable journal of an offline pass, one per rank): :func:`append_records` appends one JSON line
  per finished prompt and fsyncs; :func:`read_part_file` reads them back, ignoring a last line cut short by a kill;
  :func:`repair_part_file` drops such a tail before appending again.

The contrastive baseline file (:mod:`lightning_rlhf.contrastive`) is written from the same part files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_rlhf.atomic import atomic_write_path
from lightning_rlhf.data.sources import DataValidationError

#: fields of a sample-set record, in file order (``scores`` optional)
SAMPLE_SET_FIELDS: tuple[str, ...] = ("prompt_id", "prompt", "responses", "scores", "domain")


class SampleSetFileError(DataValidationError):
    """A sample-set, baseline or part file is unusable. The message names the file, the line (or row) and field."""


# ---------------------------------------------------------------------------------------------------- seeds
def prompt_seed(seed: int, prompt_id: str) -> int:
    """Sampling seed of one prompt: 62 bits of ``sha256(f"{seed}:{prompt_id}")``."""
    digest = hashlib.sha256(f"{int(seed)}:{prompt_id}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % (2**62)


def sample_seed(seed: int, prompt_id: str, j: int) -> int:
    """Counter-RNG seed of sample ``j`` of a prompt (static engine): :func:`prompt_seed` plus ``j`` golden-ratio
    steps, modulo ``2**62``."""
    return (prompt_seed(seed, prompt_id) + j * 0x9E3779B97F4A7C15) % (2**62)


# ---------------------------------------------------------------------------------------------------- JSON lines
def dumps_record(record: Mapping[str, Any]) -> str:
    """One JSON line (no NaN / inf: ``allow_nan=False``; the writers check first and name the prompt)."""
    return json.dumps(record, allow_nan=False, ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite literal {name}")


def parse_json_line(line: str, where: str) -> Any:
    """``json.loads`` that refuses the non-standard ``NaN`` / ``Infinity`` literals; errors name ``where``."""
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except ValueError as e:
        raise SampleSetFileError(f"{where}: invalid JSON ({e})") from None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------- the file
def sample_set_record(prompt_id: str, prompt: str, responses: Sequence[str], scores: Sequence[float] | None = None,
                      domain: str = "default") -> dict[str, Any]:
    """One record of the sample-set file (keys in file order; ``scores`` only when given)."""
    record: dict[str, Any] = {"prompt_id": prompt_id, "prompt": prompt, "responses": [str(r) for r in responses]}
    if scores is not None:
        record["scores"] = [float(s) for s in scores]
    record["domain"] = domain
    return record


def write_sorted_records(path: str | os.PathLike, records: Iterable[Mapping[str, Any]],
                         parquet_table: Callable[[list[Mapping[str, Any]]], Any]) -> Path:
    """Write records sorted by ``prompt_id`` to ``path`` atomically (temp file in the same folder, fsync, rename):
    ``.parquet`` as the ``pyarrow`` table ``parquet_table(rows)`` builds, anything else as JSON lines.

    Returns:
        The path written.
    """
    path = Path(path)
    rows = sorted(records, key=lambda r: r["prompt_id"])
    with atomic_write_path(path, prefix=f".{path.name}.tmp-") as tmp:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(parquet_table(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(dumps_record(r) + "\n" for r in rows)
    return path


def _sample_set_table(rows: list[Mapping[str, Any]]) -> Any:
    import pyarrow as pa

    columns = [c for c in SAMPLE_SET_FIELDS if c != "scores" or any("scores" in r for r in rows)]
    types = {"prompt_id": pa.string(), "prompt": pa.string(), "responses": pa.list_(pa.string()),
             "scores": pa.list_(pa.float64()), "domain": pa.string()}
    return pa.table({c: pa.array([r.get(c) for r in rows], types[c]) for c in columns})


def write_sample_set_file(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write sample-set records sorted by ``prompt_id`` to ``path`` atomically; ``.parquet`` writes a parquet table
    (needs ``pyarrow``), anything else JSON lines. Returns the path written."""
    return write_sorted_records(path, records, _sample_set_table)


@dataclass
class SampleSetRow:
    """One validated record and where it came from."""

    record: dict[str, Any]  # prompt_id, prompt, responses, scores (when the file has them), domain
    source: str  # the file
    row: int  # 1-based line (JSON lines) or row (parquet) number
    where: str  # "<file>, line N" or "<file>: row N", for messages


def _raw_records(path: Path) -> Iterable[tuple[int, str, Any]]:
    """``(number, where, object)`` per record: ``"<file>, line N"`` for JSON lines, ``"<file>: row N"`` (1-based)
    for parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file
            raise SampleSetFileError(f"{path}: unreadable parquet file ({e})") from None
        for i, row in enumerate(rows, start=1):
            yield i, f"{path}: row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                where = f"{path}, line {lineno}"
                yield lineno, where, parse_json_line(line, where)


def check_sample_set_record(obj: Any, where: str, domain_field: str | None = "domain") -> dict[str, Any]:
    """Validate one record; returns it normalised (``scores`` floats or absent, ``domain`` a string).

    Raises:
        SampleSetFileError: naming ``where`` and the field at fault.
    """
    if not isinstance(obj, dict):
        raise SampleSetFileError(f"{where}: expected a JSON object with fields {list(SAMPLE_SET_FIELDS)}, "
                                 f"got {type(obj).__name__}")
    for name in ("prompt_id", "prompt"):
        value = obj.get(name)
        if not isinstance(value, str) or not value.strip():
            raise SampleSetFileError(f"{where}, field {name!r}: missing, empty or not a string (got {value!r:.60})")
    pid = obj["prompt_id"]
    responses = obj.get("responses")
    if not isinstance(responses, list) or not responses:
        raise SampleSetFileError(f"{where}, field 'responses': expected a non-empty list of strings for prompt_id "
                                 f"{pid!r} (got {responses!r:.60})")
    for j, r in enumerate(responses):
        if not isinstance(r, str):
            raise SampleSetFileError(f"{where}, field 'responses': response {j} of prompt_id {pid!r} is not a string "
                                     f"(got {type(r).__name__})")
    out = {"prompt_id": pid, "prompt": obj["prompt"], "responses": list(responses)}
    scores = obj.get("scores")
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != len(responses):
            n = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise SampleSetFileError(f"{where}, field 'scores': expected {len(responses)} numbers (one per response) "
                                     f"for prompt_id {pid!r}, got {n}")
        for j, s in enumerate(scores):
            if not is_number(s) or not math.isfinite(float(s)):
                raise SampleSetFileError(f"{where}, field 'scores': score {j} of prompt_id {pid!r} is not a finite "
                                         f"number (got {s!r})")
        out["scores"] = [float(s) for s in scores]
    domain = obj.get(domain_field) if domain_field else None
    if domain is not None and not isinstance(domain, str):
        raise SampleSetFileError(f"{where}, field {domain_field!r}: expected a string domain label, "
                                 f"got {type(domain).__name__}")
    out["domain"] = domain or "default"
    return out


def read_sample_sets(paths: str | os.PathLike | Sequence[str | os.PathLike], domain_field: str | None = "domain",
                     skip_invalid_rows: bool = False) -> tuple[list[SampleSetRow], list[str]]:
    """Read and validate sample-set files.

    Every record must have the same number ``k`` of responses, and either all records have ``scores`` or none;
    a prompt id may appear once.

    Args:
        paths: One file or several (``.jsonl`` / ``.parquet``).
        domain_field: Field holding the domain label (missing -> ``"default"``); ``None`` ignores domains.
        skip_invalid_rows: Skip (and return the message of) bad records instead of raising. A file that cannot be
            parsed at all still raises.

    Returns:
        ``(rows, skipped_messages)``.

    Raises:
        FileNotFoundError: a file does not exist.
        SampleSetFileError: the first bad record (unless ``skip_invalid_rows``), naming file, line/row and field.
    """
    sources = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[SampleSetRow] = []
    skipped: list[str] = []
    first: dict[str, Any] = {}  # where / k / has_scores of the first good record
    seen: dict[str, str] = {}
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"sample-set file {path} does not exist (write one with the policy-samples pass: "
                                    "python cli.py predict -c configs/policy_samples/tiny.yaml)")
        for number, where, obj in _raw_records(path):
            try:
                rec = check_sample_set_record(obj, where, domain_field)
                k, has_scores = len(rec["responses"]), "scores" in rec
                if first and k != first["k"]:
                    raise SampleSetFileError(f"{where}, field 'responses': {k} responses, but {first['where']} has "
                                             f"{first['k']} (every prompt of a sample set needs the same k)")
                if first and has_scores != first["scores"]:
                    has, lacks = (where, first["where"]) if has_scores else (first["where"], where)
                    raise SampleSetFileError(f"{where}, field 'scores': {has} has scores but {lacks} has none "
                                             "(all records have scores, or none)")
                if rec["prompt_id"] in seen:
                    raise SampleSetFileError(f"{where}, field 'prompt_id': {rec['prompt_id']!r} already at "
                                             f"{seen[rec['prompt_id']]} (one record per prompt)")
            except SampleSetFileError as e:
                if not skip_invalid_rows:
                    raise
                skipped.append(str(e))
                continue
            first = first or {"where": where, "k": k, "scores": has_scores}
            seen[rec["prompt_id"]] = where
            out.append(SampleSetRow(rec, str(path), number, where))
    return out, skipped


# ---------------------------------------------------------------------------------------------------- part files
def append_records(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Append JSON lines to a part file and fsync, so a finished batch survives a kill."""
    if not records:
        return
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        f.write("".join(dumps_record(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_part_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a part file. A last line without its newline (a write cut by a kill) is ignored; a bad line
    anywhere else raises :class:`SampleSetFileError` naming the file and line.

    Every record needs a string ``prompt_id``; ``scores`` (when present) must be a list of finite numbers and
    ``responses`` (when present) a list of strings. Which of the two a pass needs is checked when it merges.
    """
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
        obj = parse_json_line(line, where)
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt_id"), str):
            raise SampleSetFileError(f"{where}: expected an object with a string 'prompt_id'")
        pid = obj["prompt_id"]
        scores, responses = obj.get("scores"), obj.get("responses")
        if scores is not None and not (isinstance(scores, list)
                                       and all(is_number(s) and math.isfinite(s) for s in scores)):
            raise SampleSetFileError(f"{where}, field 'scores': non-numeric or non-finite score for prompt_id {pid!r}")
        if responses is not None and not (isinstance(responses, list) and all(isinstance(r, str) for r in responses)):
            raise SampleSetFileError(f"{where}, field 'responses': expected a list of strings for prompt_id {pid!r}")
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
