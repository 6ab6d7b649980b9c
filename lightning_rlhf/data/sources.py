"""Reading rows from local files or hub datasets, and validating them with errors that name file, row and field.

Local json / jsonl (optionally ``.gz``) files are read line by line in Python so a row with a missing field, an
empty value or a value of the wrong type is reported with its exact line; parquet and csv go through ``datasets``.
Anything that is not an existing local path is treated as a hub dataset name (``datasets.load_dataset``).
``builtin:hh-rlhf`` names the small HH-RLHF subset shipped in ``lightning_rlhf/assets/data``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
BUILTIN_PREFIX = "builtin:"
#: built-in name -> kind -> split -> file name in ``assets/data``
BUILTIN_DATASETS: dict[str, dict[str, dict[str, str]]] = {
    "hh-rlhf": {
        kind: {split: f"hh_{kind}_{split}.jsonl.gz" for split in ("train", "test")}
        for kind in ("preferences", "demonstrations", "prompts")
    }
}


class DataValidationError(ValueError):
    """A row of an input file is unusable. The message names the file, the row and the field."""


@dataclass
class Row:
    """One validated row: the text fields a data module asked for, plus where it came from."""

    fields: dict[str, str]
    domain: str
    source: str
    row: int  # 1-based row number in its file (the line number for jsonl)


@dataclass
class ReadReport:
    """What reading a source produced: the good rows and the skipped ones (with their reasons)."""

    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt: the first 16 hex digits of the sha256 of its UTF-8 text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def resolve_builtin(name: str, kind: str, split: str) -> str:
    """Path of a built-in data file, e.g. ``resolve_builtin("builtin:hh-rlhf", "preferences", "train")``."""
    key = name[len(BUILTIN_PREFIX) :]
    if key not in BUILTIN_DATASETS:
        raise ValueError(f"Unknown built-in dataset {name!r}; available: {[BUILTIN_PREFIX + k for k in BUILTIN_DATASETS]}")
    return str(DATA_DIR / BUILTIN_DATASETS[key][kind][split])


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Expand a path, a glob or a list of them into a sorted list of sources (hub names pass through)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        matches = sorted(glob.glob(s)) if any(ch in s for ch in "*?[") else []
        out.extend(matches or [s])
    return out


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


#: what a truncated or corrupt (gzip) file raises while it is read
_UNREADABLE = (EOFError, OSError, zlib.error, UnicodeDecodeError)


def _unreadable(path: str, error: BaseException, lines_read: int | None = None) -> DataValidationError:
    where = f" after line {lines_read}" if lines_read is not None else ""
    return DataValidationError(
        f"{path}: cannot be read{where}: the file is truncated or corrupt ({type(error).__name__}: {error}). "
        "Re-create or re-download it."
    )


def _iter_json_rows(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, object)`` from a jsonl file (row number = line number) or a json array/object file."""
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith(".jsonl"):
        lineno = 0
        try:
            with _open_text(path) as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataValidationError(
                            f"{path}: row {lineno} (line {lineno}) is not valid JSON: {e.msg}"
                        ) from None
                    yield lineno, row
        except _UNREADABLE as e:  # a truncated .gz: EOFError / BadGzipFile in the middle of a line
            raise _unreadable(path, e, lineno) from e
        return
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataValidationError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from None
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e
    if isinstance(data, dict):  # {"data": [...]} or column-oriented {"prompt": [...], ...}
        if len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        elif all(isinstance(v, list) for v in data.values()):
            n = len(next(iter(data.values())))
            data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DataValidationError(f"{path}: expected a JSON array of objects")
    yield from enumerate(data, start=1)


def _iter_table_rows(path: str) -> Iterator[tuple[int, Any]]:
    import datasets

    stem = path[:-3] if path.endswith(".gz") else path
    builder = "parquet" if stem.endswith(".parquet") else "csv"
    ds = datasets.load_dataset(builder, data_files=path, split="train")
    for i, row in enumerate(ds, start=1):
        yield i, row


def _iter_hub_rows(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, typo, ...
        raise FileNotFoundError(
            f"{name!r} is neither an existing local file nor a loadable hub dataset (split={split!r}): {e}"
        ) from e
    for i, row in enumerate(ds, start=1):
        yield i, row


def iter_raw_rows(source: str, hub_split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, row)`` from a local file (json, jsonl, parquet, csv; ``.gz`` allowed) or a hub dataset."""
    p = Path(source)
    if p.exists():
        stem = source[:-3] if source.endswith(".gz") else source
        if stem.endswith((".jsonl", ".json")):
            return _iter_json_rows(source)
        if stem.endswith((".parquet", ".csv")):
            return _iter_table_rows(source)
        raise DataValidationError(f"{source}: unsupported file type (use .json, .jsonl, .parquet or .csv, optionally .gz)")
    if source.startswith(("/", "./", "../")) or source.endswith((".json", ".jsonl", ".gz", ".parquet", ".csv")):
        raise FileNotFoundError(f"Data file not found: {source}")
    return _iter_hub_rows(source, hub_split)


def validate_row(
    raw: Any, columns: dict[str, str], domain_column: str | None, source: str, row: int
) -> tuple[Row | None, str | None]:
    """Check one raw row and extract its text fields.

    Args:
        raw: The parsed row (should be a mapping).
        columns: logical field name -> column name in the file, e.g. ``{"prompt": "question"}``.
        domain_column: Optional column holding a domain label (missing -> ``"default"``).
        source: File or dataset name, for messages.
        row: 1-based row number, for messages.

    Returns:
        ``(Row, None)`` when valid, else ``(None, message)`` with a message naming file, row and field.
    """
    where = f"{source}: row {row}"
    if not isinstance(raw, dict):
        return None, f"{where}: expected an object with fields {sorted(columns.values())}, got {type(raw).__name__}"
    out: dict[str, str] = {}
    for name, col in columns.items():
        if col not in raw or raw[col] is None:
            return None, f"{where}, field {col!r}: missing (required for {name})"
        value = raw[col]
        if not isinstance(value, str):
            return None, f"{where}, field {col!r}: expected a string, got {type(value).__name__} ({str(value)[:40]!r})"
        if not value.strip():
            return None, f"{where}, field {col!r}: empty"
        out[name] = value
    domain = "default"
    if domain_column and raw.get(domain_column) is not None:
        d = raw[domain_column]
        if not isinstance(d, str):
            return None, f"{where}, field {domain_column!r}: expected a string domain label, got {type(d).__name__}"
        domain = d or "default"
    return Row(fields=out, domain=domain, source=source, row=row), None


def read_rows(
    sources: Sequence[str],
    columns: dict[str, str],
    domain_column: str | None = "domain",
    skip_invalid_rows: bool = False,
    hub_split: str = "train",
) -> ReadReport:
    """Read and validate every row of every source.

    Raises:
        DataValidationError: on the first bad row, unless ``skip_invalid_rows`` (then bad rows are counted in
            :attr:`ReadReport.skipped` and logged).
    """
    report = ReadReport()
    for source in sources:
        for row_no, raw in iter_raw_rows(source, hub_split):
            row, error = validate_row(raw, columns, domain_column, source, row_no)
            if error is not None:
                if not skip_invalid_rows:
                    raise DataValidationError(error + " (set skip_invalid_rows: true to skip and count bad rows)")
                report.skipped.append(error)
                continue
            report.rows.append(row)
    if report.skipped:
        log.warning("Skipped %d invalid rows; first: %s", len(report.skipped), report.skipped[0])
    if not report.rows:
        raise DataValidationError(f"No usable rows in {list(sources)} (columns {columns}).")
    return report
