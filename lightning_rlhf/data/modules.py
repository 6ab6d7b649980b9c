"""LightningDataModules for preferences, demonstrations, prompts and sample sets (``k`` policy samples per prompt).

Each reads local files or hub datasets (see :mod:`lightning_rlhf.data.sources`), validates every row, tokenizes
with ``datasets.Dataset.map`` and pads in the collate function. The tokenizer is the training module's own
(``trainer.lightning_module.tokenizer``) unless ``tokenizer_name_or_path`` names another.

Truncation keeps the response: a prompt longer than ``max_prompt_length`` tokens is an invalid row; when
prompt + response exceed ``max_length``, the prompt is cut from the left (keeping its end, never below
``min(len(prompt), max_length // 2)`` tokens) and then the response is cut from the right.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_rlhf.data.batches import PaddingSide, PreferenceBatch, PromptBatch, SampleSetBatch, TokenBatch
from lightning_rlhf.data.batches import pad_sequences
from lightning_rlhf.data.resumable import ResumableSampler
from lightning_rlhf.packing import first_fit_rows
from lightning_rlhf.data.sources import (
    BUILTIN_PREFIX,
    DataValidationError,
    ReadReport,
    Row,
    expand_paths,
    prompt_id,
    read_rows,
    resolve_builtin,
)

log = logging.getLogger(__name__)


def truncate_pair(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit ``prompt + response`` into ``max_length`` tokens, keeping the response where possible.

    The prompt loses tokens from its start first (down to ``min(len(prompt), max_length // 2)``), then the
    response loses tokens from its end.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt :]
    return prompt, response[: max_length - len(prompt)]


class _TextDataModule(L.LightningDataModule):
    """Shared machinery of the data modules (reading, validation, tokenization, splits, loaders).

    Args:
        train_path: Local file(s) or glob (json, jsonl, parquet, csv, optionally ``.gz``), a hub dataset name, or
            ``builtin:hh-rlhf`` (a small MIT-licensed Anthropic HH-RLHF subset shipped with the package: pairs,
            prompts with the preferred reply as demonstrations, or prompts).
        val_path: Validation file(s); default: the built-in test split, or ``val_fraction`` of the training prompts.
        val_fraction: Share of training prompts held out (split by prompt hash) when no ``val_path`` is given.
        hub_split: Split to load for hub dataset names.
        prompt_column: Column holding the prompt.
        domain_column: Optional column with a domain label carried into batches (per-domain metrics); ``null`` to
            ignore.
        domains: Keep only rows whose domain matches one of these glob patterns (e.g. ``["hh_*"]``); ``null`` keeps all.
        tokenizer_name_or_path: Tokenizer to use; default: the training module's.
        apply_chat_template: Wrap prompts in the tokenizer's chat template; default: when it has one.
        max_length: Maximum tokens of prompt + response (the prompt is left-truncated first); for prompt data only
            an upper bound.
        max_prompt_length: Prompts with more tokens are invalid rows.
        batch_size: Examples (pairs, sequences or prompts) per training batch, per rank.
        val_batch_size: Examples per validation batch; default: ``batch_size``.
        max_train_rows: Use at most this many training rows (a seeded random subset of the valid rows).
        max_val_rows: Use at most this many validation rows.
        skip_invalid_rows: Skip and count bad rows instead of raising.
        num_workers: DataLoader workers.
        seed: Seed for shuffling and subsets.
        length_bucketing: Group training batches by length (random windows of ``bucket_window`` batches sorted by
            length, then the batches shuffled): far less padding on variable-length text, same examples per epoch.
        bucket_window: Global batches per length-sorted window when ``length_bucketing`` is on.
    """

    kind: str = ""  # preferences | demonstrations | prompts | samples
    text_fields: tuple[str, ...] = ()

    def __init__(
        self,
        train_path: str | list[str] = "builtin:hh-rlhf",
        val_path: str | list[str] | None = None,
        val_fraction: float = 0.05,
        hub_split: str = "train",
        prompt_column: str = "prompt",
        domain_column: str | None = "domain",
        domains: list[str] | None = None,
        tokenizer_name_or_path: str | None = None,
        apply_chat_template: bool | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_train_rows: int | None = None,
        max_val_rows: int | None = None,
        skip_invalid_rows: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        length_bucketing: bool = False,
        bucket_window: int = 32,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1 (examples per batch and rank), got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1 or null (= data.batch_size), got {val_batch_size}")
        for flag, value in (("max_train_rows", max_train_rows), ("max_val_rows", max_val_rows)):
            if value is not None and value < 1:
                raise ValueError(f"data.{flag} must be >= 1 or null (all rows), got {value}")
        if max_length < 1 or max_prompt_length < 1:
            raise ValueError(f"data.max_length and data.max_prompt_length must be >= 1, got {max_length}, "
                             f"{max_prompt_length}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if max_prompt_length >= max_length and self.kind != "prompts":
            raise ValueError(f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length "
                             f"({max_length}).")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.train_path = train_path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.hub_split = hub_split
        self.prompt_column = prompt_column
        self.domain_column = domain_column
        self.domains = domains
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.apply_chat_template = apply_chat_template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_train_rows = max_train_rows
        self.max_val_rows = max_val_rows
        self.skip_invalid_rows = skip_invalid_rows
        self.num_workers = num_workers
        self.seed = seed
        if bucket_window < 1:
            raise ValueError(f"data.bucket_window must be >= 1, got {bucket_window}")
        self.length_bucketing = length_bucketing
        self.bucket_window = bucket_window
        self.tokenizer: Any = None
        self.domain_names: list[str] = []
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.num_skipped: int = 0
        # --- resumable training order (lightning_rlhf/data/resumable.py) ---
        self._train_sampler: ResumableSampler | None = None
        self._sampler_state_to_load: dict[str, Any] | None = None

    # ------------------------------------------------------------------ subclass interface
    def columns(self) -> dict[str, str]:
        """Logical field -> column name."""
        raise NotImplementedError

    def encode(self, rows: dict[str, list], encoder: "_Encoder") -> dict[str, list]:
        """Tokenize a batch of rows (``datasets.map(batched=True)``); must add ``prompt_len`` per row."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]]) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ setup
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer (otherwise it comes from ``tokenizer_name_or_path`` or the training module)."""
        self.tokenizer = tokenizer

    def _resolve_tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name_or_path is not None:
            from lightning_rlhf.models.factory import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_name_or_path)
            return self.tokenizer
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        tok = getattr(module, "tokenizer", None)
        if tok is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer: set data.tokenizer_name_or_path, call set_tokenizer(), "
                "or use it with a module that has a `tokenizer` attribute."
            )
        self.tokenizer = tok
        return tok

    def _sources(self, spec: str | list[str], split: str) -> list[str]:
        if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
            return [resolve_builtin(spec, self.kind, split)]
        return expand_paths(spec)

    def read_report(self, sources: list[str]) -> ReadReport:
        """Read and validate the rows of ``sources`` (subclasses with another file format override this)."""
        return read_rows(sources, self.columns(), self.domain_column, self.skip_invalid_rows, self.hub_split)

    def _read(self, spec: str | list[str], split: str) -> list[Row]:
        report = self.read_report(self._sources(spec, split))
        self.num_skipped += len(report.skipped)
        rows = report.rows
        if self.domains:
            rows = [r for r in rows if any(fnmatch.fnmatchcase(r.domain, pat) for pat in self.domains)]
            if not rows:
                raise DataValidationError(f"No rows of {spec!r} match data.domains={self.domains}.")
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        tokenizer = self._resolve_tokenizer()
        encoder = _Encoder(tokenizer, self.max_length, self.max_prompt_length, self.apply_chat_template)
        train_rows = self._read(self.train_path, "train")
        if self.val_path is not None:
            val_rows = self._read(self.val_path, "train")
        elif isinstance(self.train_path, str) and self.train_path.startswith(BUILTIN_PREFIX):
            val_rows = self._read(self.train_path, "test")
        elif self.val_fraction > 0:
            # split by prompt hash so one prompt never lands in both splits
            cut = int(self.val_fraction * 10_000)
            is_val = [int(prompt_id(r.fields["prompt"]), 16) % 10_000 < cut for r in train_rows]
            val_rows = [r for r, v in zip(train_rows, is_val) if v]
            train_rows = [r for r, v in zip(train_rows, is_val) if not v]
        else:
            val_rows = []
        self.domain_names = sorted({r.domain for r in train_rows} | {r.domain for r in val_rows})
        self.train_dataset = self._build(train_rows, encoder, self.max_train_rows)
        self.val_dataset = self._build(val_rows, encoder, self.max_val_rows) if val_rows else None
        log.info(
            "%s: %d train / %d val rows, domains %s, %d invalid rows skipped",
            type(self).__name__,
            len(self.train_dataset),
            0 if self.val_dataset is None else len(self.val_dataset),
            self.domain_names,
            self.num_skipped,
        )

    def _build(self, rows: list[Row], encoder: "_Encoder", limit: int | None) -> Any:
        import datasets

        domain_index = {d: i for i, d in enumerate(self.domain_names)}
        records = [
            {**r.fields, "domain_id": domain_index[r.domain], "domain": r.domain, "source": r.source, "row": r.row}
            for r in rows
        ]
        ds = datasets.Dataset.from_list(records)
        ds = ds.map(lambda b: self.encode(b, encoder), batched=True, desc=f"tokenizing {self.kind}")
        too_long = [i for i, p in enumerate(ds["prompt_len"]) if p > self.max_prompt_length]
        if too_long:
            bad = ds[too_long[0]]
            msg = (
                f"{bad['source']}: row {bad['row']}, field {self.prompt_column!r}: prompt has {bad['prompt_len']} "
                f"tokens, more than max_prompt_length={self.max_prompt_length}"
            )
            if not self.skip_invalid_rows:
                raise DataValidationError(
                    f"{msg} (raise data.max_prompt_length, or set skip_invalid_rows: true; "
                    f"{len(too_long)} rows are too long)"
                )
            log.warning("Skipping %d rows whose prompt exceeds max_prompt_length; first: %s", len(too_long), msg)
            self.num_skipped += len(too_long)
            keep = sorted(set(range(len(ds))) - set(too_long))
            ds = ds.select(keep)
        if len(ds) == 0:
            raise DataValidationError(f"No rows left in {self.train_path!r} after validation.")
        if limit is not None and limit < len(ds):  # a seeded subset of the valid rows, so it has `limit` rows
            ds = ds.shuffle(seed=self.seed).select(range(limit)).flatten_indices()
        return ds.add_column("index", list(range(len(ds))))

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: Any, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=generator,
            drop_last=shuffle and len(ds) >= batch_size,
        )

    # --- resumable training order: begin ---
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches from a :class:`ResumableSampler`: the order depends on ``seed`` and the epoch only (not on
        the number of ranks), and a run resumed from a mid-epoch checkpoint continues where it stopped."""
        world, rank = self._world()
        # drop the incomplete last global batch (as drop_last does on one process): equal epochs on any number of ranks
        lengths = self.train_dataset["length"] if self.length_bucketing else None  # padded tokens per example
        sampler = ResumableSampler(self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                   global_batch_size=self.batch_size * world, lengths=lengths,
                                   bucket_window=self.bucket_window)
        if self._sampler_state_to_load is not None:
            sampler.load_state_dict(self._sampler_state_to_load)
            self._sampler_state_to_load = None
        self._train_sampler = sampler
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=generator,
            drop_last=False,  # the sampler already keeps whole batches only (unless the data is smaller than one)
        )

    def _samples_consumed(self) -> int:
        """Training samples of the current epoch consumed so far, summed over ranks (from the fit loop's counters:
        ``processed`` counts batches whose ``training_step`` has run, unlike the loader, which may fetch ahead)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return batches * self.batch_size * trainer.world_size
    # --- resumable training order: end ---

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The training rows in order, unshuffled (offline passes over the RL prompts, e.g. contrastive baselines)."""
        return self._loader(self.train_dataset, self.batch_size, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"domain_names": list(self.domain_names)}
        if self._train_sampler is not None:
            state["train_sampler"] = self._train_sampler.state_dict(self._samples_consumed())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("domain_names")
        if saved and self.domain_names and saved != self.domain_names:
            log.warning("Domains differ from the checkpoint's: %s vs %s", self.domain_names, saved)
        self._sampler_state_to_load = state_dict.get("train_sampler")


class _Encoder:
    """Turns prompt / response text into token ids (chat template applied when the tokenizer has one)."""

    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int, apply_chat_template: bool | None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if apply_chat_template and not has_template:
            raise ValueError("data.apply_chat_template is true but the tokenizer has no chat template.")
        self.chat = has_template if apply_chat_template is None else apply_chat_template
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no eos token; responses must end with one.")

    def prompts(self, texts: Sequence[str]) -> list[list[int]]:
        if self.chat:
            return [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True, return_dict=False
                )
                for t in texts
            ]
        return self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]

    def responses(self, texts: Sequence[str]) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        return [ids + [eos] for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _pairs_to_tensors(prompt_lens: list[int], seqs: list[list[int]], pad_id: int, side: PaddingSide):
    input_ids = pad_sequences(seqs, pad_id, side)
    attention_mask = pad_sequences([[1] * len(s) for s in seqs], 0, side)
    loss_mask = pad_sequences([[0] * p + [1] * (len(s) - p) for p, s in zip(prompt_lens, seqs)], 0, side)
    return input_ids, attention_mask, loss_mask


def greedy_pack(
    seqs: list[list[int]], prompt_lens: list[int], domain_ids: list[int], row_length: int, pad_id: int
) -> TokenBatch:
    """Lay sequences end to end in rows of at most ``row_length`` tokens (first-fit decreasing,
    :func:`~lightning_rlhf.packing.first_fit_rows`), right-padded to the longest row: a packed
    :class:`~lightning_rlhf.data.batches.TokenBatch` (``position_ids`` restart per sequence; ``loss_mask`` 1 on the
    response tokens except a sequence's first token, which no logits of its own sequence predict).

    Args:
        seqs: ``B`` token-id sequences (prompt + response).
        prompt_lens: Prompt tokens at the start of each.
        domain_ids: Domain of each.
        row_length: Most tokens per row (a longer sequence gets a row of its own).
        pad_id: Fill id of the row ends.
    """
    rows = first_fit_rows([len(s) for s in seqs], row_length)
    ids, pos, loss = [], [], []
    for row in rows:
        ids.append([t for i in row for t in seqs[i]])
        pos.append([p for i in row for p in range(len(seqs[i]))])
        loss.append([int(p >= max(prompt_lens[i], 1)) for i in row for p in range(len(seqs[i]))])
    return TokenBatch(
        input_ids=pad_sequences(ids, pad_id, "right"),
        attention_mask=pad_sequences([[1] * len(r) for r in ids], 0, "right"),
        loss_mask=pad_sequences(loss, 0, "right"),
        domain_ids=torch.tensor([domain_ids[row[0]] for row in rows], dtype=torch.long),
        position_ids=pad_sequences(pos, 0, "right"),
    )


class PreferenceDataModule(_TextDataModule):
    """Preference pairs ``(prompt, chosen, rejected)`` for reward models and DPO-style methods.

    The shared arguments (files, columns, lengths, batch sizes, bucketing) are listed by ``--data.help``.

    Args:
        chosen_column: Column holding the preferred response.
        rejected_column: Column holding the dispreferred response.
        padding_side: Pad sequences on the ``right`` (default) or ``left``.
    """

    kind = "preferences"

    def __init__(
        self,
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        padding_side: PaddingSide = "right",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chosen_column = chosen_column
        self.rejected_column = rejected_column
        self.padding_side = padding_side

    def columns(self) -> dict[str, str]:
        return {"prompt": self.prompt_column, "chosen": self.chosen_column, "rejected": self.rejected_column}

    def encode(self, rows: dict[str, list], encoder: _Encoder) -> dict[str, list]:
        prompts = encoder.prompts(rows["prompt"])
        out: dict[str, list] = {"prompt_len": [len(p) for p in prompts]}
        for key in ("chosen", "rejected"):
            seqs, plens = [], []
            for p, r in zip(prompts, encoder.responses(rows[key])):
                p, r = truncate_pair(p, r, encoder.max_length)
                seqs.append(p + r)
                plens.append(len(p))
            out[f"{key}_ids"], out[f"{key}_prompt_len"] = seqs, plens
        out["length"] = [max(len(c), len(r)) for c, r in zip(out["chosen_ids"], out["rejected_ids"])]
        return out

    def collate(self, items: list[dict[str, Any]]) -> PreferenceBatch:
        seqs = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
        plens = [it["chosen_prompt_len"] for it in items] + [it["rejected_prompt_len"] for it in items]
        input_ids, attention_mask, loss_mask = _pairs_to_tensors(plens, seqs, self.tokenizer.pad_token_id, self.padding_side)
        return PreferenceBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            domain_ids=torch.tensor([it["domain_id"] for it in items], dtype=torch.long),
            index=torch.tensor([it["index"] for it in items], dtype=torch.long),
        )


class DemonstrationDataModule(_TextDataModule):
    """Demonstrations ``(prompt, response)`` for SFT and demonstration-based methods.

    The shared arguments (files, columns, lengths, batch sizes, bucketing) are listed by ``--data.help``.

    Args:
        response_column: Column holding the demonstrated response.
        padding_side: Pad sequences on the ``right`` (default) or ``left``.
        packing: ``none``, or ``greedy``: each batch's ``batch_size`` examples are laid end to end in as few rows of at
            most ``max_length`` tokens as first-fit decreasing finds, with position ids restarting per example (no
            attention across examples, see :class:`~lightning_rlhf.data.batches.TokenBatch`); the same examples per
            batch, so the same token-mean loss as unpacked. Raise ``batch_size`` to fill more rows per step. Train
            with ``model.packing: greedy``. Packed batches carry no prompt tensors (no sampling on their prompts).
    """

    kind = "demonstrations"

    def __init__(
        self,
        response_column: str = "response",
        padding_side: PaddingSide = "right",
        packing: Literal["none", "greedy"] = "none",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if packing not in ("none", "greedy"):
            raise ValueError(f"data.packing must be 'none' or 'greedy', got {packing!r}")
        self.response_column = response_column
        self.padding_side = padding_side
        self.packing = packing

    def columns(self) -> dict[str, str]:
        return {"prompt": self.prompt_column, "response": self.response_column}

    def encode(self, rows: dict[str, list], encoder: _Encoder) -> dict[str, list]:
        prompts = encoder.prompts(rows["prompt"])
        seqs, plens = [], []
        for p, r in zip(prompts, encoder.responses(rows["response"])):
            p, r = truncate_pair(p, r, encoder.max_length)
            seqs.append(p + r)
            plens.append(len(p))
        return {"prompt_len": [len(p) for p in prompts], "input_ids": seqs, "seq_prompt_len": plens, "prompt_ids": prompts,
                "length": [len(x) for x in seqs]}

    def collate(self, items: list[dict[str, Any]]) -> TokenBatch:
        pad = self.tokenizer.pad_token_id
        if self.packing == "greedy":
            return greedy_pack([it["input_ids"] for it in items], [it["seq_prompt_len"] for it in items],
                               [it["domain_id"] for it in items], self.max_length, pad)
        input_ids, attention_mask, loss_mask = _pairs_to_tensors(
            [it["seq_prompt_len"] for it in items], [it["input_ids"] for it in items], pad, self.padding_side
        )
        prompts = [it["prompt_ids"] for it in items]
        return TokenBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            domain_ids=torch.tensor([it["domain_id"] for it in items], dtype=torch.long),
            prompt_input_ids=pad_sequences(prompts, pad, "left"),
            prompt_attention_mask=pad_sequences([[1] * len(p) for p in prompts], 0, "left"),
        )


class PromptDataModule(_TextDataModule):
    """Prompts for online RL (PPO and the methods built on it). Batches are left-padded for generation.

    The shared arguments (files, columns, lengths, batch sizes, bucketing) are listed by ``--data.help``.
    """

    kind = "prompts"

    def columns(self) -> dict[str, str]:
        return {"prompt": self.prompt_column}

    def encode(self, rows: dict[str, list], encoder: _Encoder) -> dict[str, list]:
        prompts = encoder.prompts(rows["prompt"])
        return {"prompt_len": [len(p) for p in prompts], "input_ids": prompts, "length": [len(p) for p in prompts]}

    def collate(self, items: list[dict[str, Any]]) -> PromptBatch:
        prompts = [it["input_ids"] for it in items]
        return PromptBatch(
            input_ids=pad_sequences(prompts, self.tokenizer.pad_token_id, "left"),
            attention_mask=pad_sequences([[1] * len(p) for p in prompts], 0, "left"),
            domain_ids=torch.tensor([it["domain_id"] for it in items], dtype=torch.long),
            prompt_ids=[prompt_id(it["prompt"]) for it in items],
            prompts=[it["prompt"] for it in items],
            domains=[it["domain"] for it in items],
        )


class SampleSetDataModule(_TextDataModule):
    """Sample sets ``(prompt, k responses, optional k scores)`` written by the policy-samples pass
    (:class:`~lightning_rlhf.methods.policy_samples.PolicySamplesModule`; file format in
    :mod:`lightning_rlhf.sample_sets`), as :class:`~lightning_rlhf.data.batches.SampleSetBatch`: ``batch_size``
    prompts per batch, row ``b * k + j`` = prompt ``b`` + its response ``j`` (rows of one prompt adjacent).

    Prompts and responses are tokenised exactly as preference pairs are (same chat template, an EOS appended to every
    response, the same truncation: prompt cut from the left first, then the response from the right). The stored
    responses are decoded text, so a response that was cut at ``max_new_tokens`` gets an EOS here too.

    The shared arguments (files, lengths, batch sizes, splits, bucketing) are listed by ``--data.help``; here
    ``train_path`` / ``val_path`` are sample-set files (``.jsonl`` or ``.parquet``, globs allowed; no hub names or
    ``builtin:`` data), ``prompt_column`` is fixed to ``prompt`` and ``domain_column`` names the domain field.
    Every record of all files must have the same ``k``; bad records raise (file, line or row, field) unless
    ``skip_invalid_rows``. ``length_bucketing`` groups prompts by their longest sample.

    Args:
        padding_side: Pad sequences on the ``right`` (default) or ``left``.
    """

    kind = "samples"

    def __init__(self, padding_side: PaddingSide = "right", **kwargs: Any) -> None:
        kwargs.setdefault("train_path", "runs/policy_samples_tiny/samples.jsonl")
        super().__init__(**kwargs)
        for name in ("train_path", "val_path"):
            spec = getattr(self, name)
            specs = [spec] if isinstance(spec, str) else list(spec or [])
            if any(s.startswith(BUILTIN_PREFIX) for s in specs):
                raise ValueError(f"data.{name}={spec!r}: there is no built-in sample set; write one with "
                                 "`python cli.py predict -c configs/policy_samples/tiny.yaml`")
        if self.prompt_column != "prompt":
            raise ValueError(f"data.prompt_column={self.prompt_column!r}: sample-set files always use 'prompt'")
        self.padding_side = padding_side
        #: ``k``, responses per prompt (known after ``setup``)
        self.num_samples: int | None = None

    def columns(self) -> dict[str, str]:
        return {"prompt": "prompt", "responses": "responses"}

    def read_report(self, sources: list[str]) -> ReadReport:
        from lightning_rlhf.sample_sets import read_sample_sets

        records, skipped = read_sample_sets(sources, self.domain_column, self.skip_invalid_rows)
        if skipped:
            log.warning("Skipped %d invalid sample-set records; first: %s", len(skipped), skipped[0])
        if not records:
            raise DataValidationError(f"No usable records in {sources}.")
        k = len(records[0].record["responses"])
        if self.num_samples is not None and k != self.num_samples:  # train and val files must agree too
            raise DataValidationError(f"{records[0].where}, field 'responses': {k} responses per prompt, but the "
                                      f"training files have {self.num_samples}")
        self.num_samples = k
        rows = []
        for r in records:
            fields = {"prompt": r.record["prompt"], "prompt_id": r.record["prompt_id"],
                      "responses": r.record["responses"]}
            if "scores" in r.record:
                fields["scores"] = r.record["scores"]
            rows.append(Row(fields=fields, domain=r.record["domain"], source=r.source, row=r.row))
        return ReadReport(rows=rows, skipped=skipped)

    def encode(self, rows: dict[str, list], encoder: _Encoder) -> dict[str, list]:
        prompts = encoder.prompts(rows["prompt"])
        out: dict[str, list] = {"prompt_len": [len(p) for p in prompts], "seqs": [], "seq_prompt_lens": [],
                                "length": []}
        for p, responses in zip(prompts, rows["responses"]):
            seqs, plens = [], []
            for r in encoder.responses(responses):
                pp, rr = truncate_pair(p, r, encoder.max_length)
                seqs.append(pp + rr)
                plens.append(len(pp))
            out["seqs"].append(seqs)
            out["seq_prompt_lens"].append(plens)
            out["length"].append(max(len(x) for x in seqs))
        return out

    def collate(self, items: list[dict[str, Any]]) -> SampleSetBatch:
        k = len(items[0]["seqs"])
        seqs = [s for it in items for s in it["seqs"]]  # row b * k + j = response j of prompt b
        plens = [p for it in items for p in it["seq_prompt_lens"]]
        input_ids, attention_mask, loss_mask = _pairs_to_tensors(plens, seqs, self.tokenizer.pad_token_id,
                                                                 self.padding_side)
        scores = None
        if items[0].get("scores") is not None:
            scores = torch.tensor([s for it in items for s in it["scores"]], dtype=torch.float32)  # (B*k,)
        return SampleSetBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            domain_ids=torch.tensor([it["domain_id"] for it in items], dtype=torch.long),
            num_samples=k,
            prompt_ids=[it["prompt_id"] for it in items],
            scores=scores,
            index=torch.tensor([it["index"] for it in items], dtype=torch.long),
        )
