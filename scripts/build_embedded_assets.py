#!/usr/bin/env python
"""Build the small embedded default dataset and offline tokenizer of ``lightning_rlhf``.

The package ships a tiny, permissively licensed (MIT) RLHF dataset plus a byte-level BPE
tokenizer trained on it, so examples and tests run fully offline on a CPU.  This script is
how those assets were produced; users never need to run it.

Input: the offline RLHF data bundle (``preferences_{train,test}.jsonl.gz``, ``MANIFEST.json``).
Only the four Anthropic HH-RLHF domains are used, because they are the only MIT-licensed
preference data in the bundle:

    hh_harmless_base, hh_helpful_base, hh_helpful_online, hh_helpful_rejection_sampled

Output (under ``--out``, default ``lightning_rlhf/assets``)::

    data/hh_preferences_{train,test}.jsonl.gz      {"prompt", "chosen", "rejected", "domain"}
    data/hh_demonstrations_{train,test}.jsonl.gz   {"prompt", "response", "domain"}
    data/hh_prompts_{train,test}.jsonl.gz          {"prompt", "domain"}
    data/ATTRIBUTION.md                            provenance, MIT licence, selection, counts
    tokenizer/{tokenizer.json,tokenizer_config.json,special_tokens_map.json}

Selection (deterministic, no randomness anywhere):

1. Keep HH rows of the bundle's split (the bundle's own prompt-hash split is kept, so train
   and test prompts are disjoint) whose ``chosen`` and ``rejected`` are non-empty after
   ``strip()`` and differ after ``strip()``.
2. Give each row a *length tier*: the first ``(max prompt chars, max reply chars)`` pair of
   ``LENGTH_TIERS`` that it fits (reply = the longer of chosen/rejected).  Rows that fit no
   tier are dropped.  Short rows keep the default data fast to train on a CPU.
3. Within a domain, order rows by ``(tier, sha256(prompt + "\\0" + chosen + "\\0" + rejected))``
   and take the first ``quota`` rows.  So the strict tier is used first, and longer tiers only
   fill in where a domain has too few short rows (mainly ``hh_helpful_online``, whose replies
   are long).
4. Quotas are balanced over the four domains by water-filling: every domain gets the same
   quota ``q`` (the largest such that the total stays within ``--train-rows`` / ``--test-rows``);
   a domain with fewer eligible rows gives its leftover quota to the others.
5. Rows are shuffled by ``sha256("shuffle\\0" + prompt + "\\0" + chosen + "\\0" + rejected)``.
   Demonstrations are the same rows with ``response = chosen`` (exact duplicates removed);
   prompts are the distinct prompts of those rows, in first-occurrence order.

gzip files are written with ``mtime=0`` and no file name, and the tokenizer trainer is run
single-threaded, so a rebuild is byte-identical.

Usage (from the repository root)::

    python scripts/build_embedded_assets.py                 # data + tokenizer
    python scripts/build_embedded_assets.py --data-only
    python scripts/build_embedded_assets.py --tokenizer-only   # from the embedded train data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

# Must be set before ``tokenizers`` is imported: single-threaded training is deterministic.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

HH_DOMAINS: Tuple[str, ...] = (
    "hh_harmless_base",
    "hh_helpful_base",
    "hh_helpful_online",
    "hh_helpful_rejection_sampled",
)

# (max prompt characters, max characters of the longer reply), tried in order.
LENGTH_TIERS: Tuple[Tuple[int, int], ...] = (
    (400, 300),
    (600, 400),
    (800, 500),
    (1000, 600),
    (1200, 800),
)

SPECIAL_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 2048

MIT_LICENSE = """MIT License

Copyright (c) 2022 Anthropic

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

Row = Dict[str, str]


# --------------------------------------------------------------------------- io helpers
def sha256_hex(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def read_jsonl_gz(path: Path) -> List[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl_gz(path: Path, rows: Iterable[Row]) -> None:
    """Write JSON lines through gzip with mtime=0 and no embedded file name (reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


# --------------------------------------------------------------------------- selection
def length_tier(row: Row) -> int:
    """Index of the first tier the row fits, or -1."""
    p = len(row["prompt"])
    r = max(len(row["chosen"]), len(row["rejected"]))
    for i, (max_p, max_r) in enumerate(LENGTH_TIERS):
        if p <= max_p and r <= max_r:
            return i
    return -1


def eligible(row: Row) -> bool:
    c, r = row["chosen"].strip(), row["rejected"].strip()
    return bool(row["prompt"].strip()) and bool(c) and bool(r) and c != r


def water_fill(available: Dict[str, int], total: int) -> Dict[str, int]:
    """Equal per-domain quota, leftovers of small domains redistributed; sum <= total."""
    quota = {d: 0 for d in available}
    remaining = total
    open_domains = sorted(d for d in available if available[d] > 0)
    while remaining > 0 and open_domains:
        share = remaining // len(open_domains)
        if share == 0:
            # Hand out the last few rows one each, in sorted domain order.
            for d in open_domains[:remaining]:
                quota[d] += 1
            break
        still_open = []
        for d in open_domains:
            take = min(share, available[d] - quota[d])
            quota[d] += take
            remaining -= take
            if quota[d] < available[d]:
                still_open.append(d)
        open_domains = still_open
    return quota


def select_split(rows: Sequence[dict], total: int) -> Tuple[List[Row], Dict[str, dict]]:
    """Return the selected preference rows (shuffled) and per-domain statistics."""
    by_domain: Dict[str, List[Tuple[int, str, Row]]] = defaultdict(list)
    stats: Dict[str, dict] = {d: Counter() for d in HH_DOMAINS}
    for raw in rows:
        d = raw.get("domain")
        if d not in HH_DOMAINS:
            continue
        row = {k: raw[k] for k in ("prompt", "chosen", "rejected", "domain")}
        stats[d]["bundle_rows"] += 1
        if not eligible(row):
            stats[d]["dropped_empty_or_equal"] += 1
            continue
        tier = length_tier(row)
        if tier < 0:
            stats[d]["dropped_too_long"] += 1
            continue
        by_domain[d].append((tier, sha256_hex(row["prompt"], row["chosen"], row["rejected"]), row))

    quota = water_fill({d: len(by_domain[d]) for d in HH_DOMAINS}, total)
    selected: List[Row] = []
    for d in HH_DOMAINS:
        ranked = sorted(by_domain[d], key=lambda t: (t[0], t[1]))[: quota[d]]
        stats[d]["eligible"] = len(by_domain[d])
        stats[d]["selected"] = len(ranked)
        for tier, _, _ in ranked:
            stats[d][f"tier{tier}"] += 1
        selected.extend(row for _, _, row in ranked)

    selected.sort(key=lambda r: sha256_hex("shuffle", r["prompt"], r["chosen"], r["rejected"]))
    return selected, stats


def demonstrations(prefs: Sequence[Row]) -> List[Row]:
    seen, out = set(), []
    for r in prefs:
        key = (r["prompt"], r["chosen"])
        if key in seen:
            continue
        seen.add(key)
        out.append({"prompt": r["prompt"], "response": r["chosen"], "domain": r["domain"]})
    return out


def prompts(prefs: Sequence[Row]) -> List[Row]:
    seen, out = set(), []
    for r in prefs:
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        out.append({"prompt": r["prompt"], "domain": r["domain"]})
    return out


# --------------------------------------------------------------------------- attribution
def _count_table(files: Dict[str, List[Row]]) -> str:
    names = list(files)
    lines = ["| domain | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for d in HH_DOMAINS:
        cells = [str(sum(r["domain"] == d for r in files[n])) for n in names]
        lines.append(f"| `{d}` | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(str(len(files[n])) for n in names) + " |")
    return "\n".join(lines)


def attribution_md(files: Dict[str, List[Row]], stats: Dict[str, Dict[str, dict]],
                   manifest: dict, totals: Dict[str, int]) -> str:
    pins = manifest.get("pins", {})
    hh_pin = pins.get("anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d")
    easy_pin = pins.get("DaehanKim/EasyRLHF", "45eccb72ddb8c18aa52dc2a184516380e06582fe")
    mfiles = manifest.get("files", {})

    tiers = ", ".join(f"T{i}: prompt <= {p} and reply <= {r} chars"
                      for i, (p, r) in enumerate(LENGTH_TIERS))
    stat_lines = ["| split | domain | bundle rows | non-empty, fit a tier | selected | per tier (T0..T4) |",
                  "|---|---|---:|---:|---:|---|"]
    for split in ("train", "test"):
        for d in HH_DOMAINS:
            s = stats[split][d]
            per_tier = " / ".join(str(s.get(f"tier{i}", 0)) for i in range(len(LENGTH_TIERS)))
            stat_lines.append(f"| {split} | `{d}` | {s['bundle_rows']} | {s['eligible']} | "
                              f"{s['selected']} | {per_tier} |")

    src_sha = []
    for name in ("preferences_train.jsonl.gz", "preferences_test.jsonl.gz"):
        if name in mfiles and "sha256" in mfiles[name]:
            src_sha.append(f"  - `{name}`: sha256 `{mfiles[name]['sha256']}`")

    return f"""# Embedded HH-RLHF subset: attribution and licence

> **Content warning.** `hh_harmless_base` is red-teaming data: the human turns deliberately
> ask for harmful, offensive or illegal content, and some assistant replies (including some
> `chosen` ones) contain offensive, toxic or otherwise upsetting text. This is by design. The
> data is meant for training and testing alignment methods, not for display to end users.

## What these files are

A small default dataset shipped inside `lightning_rlhf` so that examples and tests run
offline on a CPU. All rows are from Anthropic's HH-RLHF human-preference data.

| file | fields |
|---|---|
| `hh_preferences_{{train,test}}.jsonl.gz` | `prompt`, `chosen`, `rejected`, `domain` |
| `hh_demonstrations_{{train,test}}.jsonl.gz` | `prompt`, `response` (the `chosen` reply of the same rows), `domain` |
| `hh_prompts_{{train,test}}.jsonl.gz` | `prompt`, `domain` (distinct prompts of the preference rows) |

One JSON object per line, UTF-8, gzip. `prompt` is a raw Anthropic transcript
(`"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"`); `chosen`,
`rejected` and `response` hold only the final assistant turn with its leading space, so
`prompt + chosen` is the original HH transcript. No chat template is applied.

The tokenizer in `../tokenizer/` is a byte-level BPE (vocab {VOCAB_SIZE}) trained by the same
script on the train prompts and replies of these files, so it is a derived work of the same
data and is covered by the same attribution.

## Source

- **Anthropic HH-RLHF**, <https://github.com/anthropics/hh-rlhf>, MIT licence
  (Bai et al., 2022, "Training a Helpful and Harmless Assistant with Reinforcement Learning
  from Human Feedback", arXiv:2204.05862).
- Only the HH-RLHF **test** splits were available offline; they were taken as redistributed
  in an offline RLHF data bundle, from these files:
  - `hh_harmless_base`: anthropics/hh-rlhf @ `{hh_pin}` : `harmless-base/test.jsonl.gz`
  - `hh_helpful_base`: DaehanKim/EasyRLHF @ `{easy_pin}` : `data/helpful-base/test.jsonl.gz`
  - `hh_helpful_online`: DaehanKim/EasyRLHF @ `{easy_pin}` : `data/helpful-online/test.jsonl.gz`
  - `hh_helpful_rejection_sampled`: DaehanKim/EasyRLHF @ `{easy_pin}` : `data/helpful-rejection-sampled/test.jsonl.gz`

  EasyRLHF vendors the Anthropic files unchanged (its harmless-base blob is byte-identical to
  Anthropic's) and states that vendored datasets keep their own terms, i.e. MIT.
- The bundle split each transcript at its last `"\\n\\nAssistant:"` into prompt and reply, dropped
  pairs whose two prompts differ, pairs with an empty reply and pairs with
  `chosen.strip() == rejected.strip()`, and re-split the rows into train/test by prompt hash:
  a row is in `test` iff `int(sha256(prompt).hexdigest()[:8], 16) % 100 < 10`. That split is
  kept here, so **train and test prompts are disjoint**. Note that *both* splits here come from
  HH-RLHF's original test files.
- Bundle input files used:
{chr(10).join(src_sha) if src_sha else "  - (MANIFEST.json not available)"}

## How the subset was selected

Built by `scripts/build_embedded_assets.py` (deterministic; a rebuild is byte-identical).

1. Keep rows of the four HH domains whose `chosen` and `rejected` are non-empty and differ
   after `strip()`.
2. Give each row the first length tier it fits ({tiers}; "reply" is the longer of
   `chosen`/`rejected`). Rows longer than the last tier are dropped.
3. Per domain, order rows by (tier, `sha256(prompt + "\\0" + chosen + "\\0" + rejected)`) and take
   the first *quota* rows: short rows first; longer tiers only fill in where a domain has few
   short rows (`hh_helpful_online` has long replies).
4. Quotas are balanced over domains by water-filling, targeting {totals['train']} train and
   {totals['test']} test rows: each domain gets the same quota unless it has fewer eligible
   rows, in which case its leftover goes to the others.
5. Rows are ordered by `sha256("shuffle\\0" + prompt + "\\0" + chosen + "\\0" + rejected)` (mixed
   domains). Demonstrations are the same rows with `response = chosen`; prompts are their
   distinct prompts.

{chr(10).join(stat_lines)}

## Row counts

{_count_table(files)}

## Licence (MIT)

The HH-RLHF data is distributed under the MIT licence:

```
{MIT_LICENSE}```
"""


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Sequence[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    assert tok.token_to_id(SPECIAL_TOKEN) == 0

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)

    specials = {
        "bos_token": SPECIAL_TOKEN,
        "eos_token": SPECIAL_TOKEN,
        "unk_token": SPECIAL_TOKEN,
        "pad_token": SPECIAL_TOKEN,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n",
                                    encoding="utf-8")


def tokenizer_texts(prefs_train: Sequence[Row]) -> List[str]:
    """Train prompts and replies (chosen and rejected), deduplicated, in a fixed order."""
    seen, texts = set(), []
    for r in prefs_train:
        for t in (r["prompt"], r["chosen"], r["rejected"]):
            if t not in seen:
                seen.add(t)
                texts.append(t)
    return texts


# --------------------------------------------------------------------------- main
def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared-data", default="../shared/data",
                    help="offline data bundle folder (relative paths: to the repo root)")
    ap.add_argument("--out", default="lightning_rlhf/assets",
                    help="assets folder to write (relative paths: to the repo root)")
    ap.add_argument("--train-rows", type=int, default=2000, help="target train preference rows")
    ap.add_argument("--test-rows", type=int, default=400, help="target test preference rows")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--data-only", action="store_true", help="do not train the tokenizer")
    group.add_argument("--tokenizer-only", action="store_true",
                       help="only (re)train the tokenizer from the embedded train data")
    args = ap.parse_args(argv)

    out = resolve(args.out)
    data_dir, tok_dir = out / "data", out / "tokenizer"

    if args.tokenizer_only:
        prefs_train = read_jsonl_gz(data_dir / "hh_preferences_train.jsonl.gz")
    else:
        src = resolve(args.shared_data)
        manifest_path = src / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        files: Dict[str, List[Row]] = {}
        stats: Dict[str, Dict[str, dict]] = {}
        totals = {"train": args.train_rows, "test": args.test_rows}
        for split in ("train", "test"):
            raw = read_jsonl_gz(src / f"preferences_{split}.jsonl.gz")
            prefs, stats[split] = select_split(raw, totals[split])
            files[f"hh_preferences_{split}"] = prefs
            files[f"hh_demonstrations_{split}"] = demonstrations(prefs)
            files[f"hh_prompts_{split}"] = prompts(prefs)

        train_p = {r["prompt"] for r in files["hh_prompts_train"]}
        test_p = {r["prompt"] for r in files["hh_prompts_test"]}
        assert not train_p & test_p, "train/test prompts overlap"

        order = [f"hh_{kind}_{split}" for kind in ("preferences", "demonstrations", "prompts")
                 for split in ("train", "test")]
        files = {k: files[k] for k in order}
        for name, rows in files.items():
            write_jsonl_gz(data_dir / f"{name}.jsonl.gz", rows)
        (data_dir / "ATTRIBUTION.md").write_text(
            attribution_md(files, stats, manifest, totals), encoding="utf-8")
        for name, rows in files.items():
            size = (data_dir / f"{name}.jsonl.gz").stat().st_size
            print(f"{name}.jsonl.gz: {len(rows)} rows, {size} bytes, "
                  f"{dict(sorted(Counter(r['domain'] for r in rows).items()))}")
        prefs_train = files["hh_preferences_train"]

    if not args.data_only:
        texts = tokenizer_texts(prefs_train)
        train_tokenizer(texts, tok_dir)
        print(f"tokenizer: trained on {len(texts)} texts -> {tok_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
