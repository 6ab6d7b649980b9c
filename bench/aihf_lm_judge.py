"""A third judge for ``bench/aihf_evidence.py``: the likelihood of each arm's responses under a real language model.

``aihf_evidence.py --out rows.jsonl`` keeps every arm's sampled responses on the held-out prompts (and, in
``rows.jsonl.refs.json``, the prompts, the untrained policy's samples and the references: the demonstrations whole and
cut to the samples' length, and the cut demonstrations with their words shuffled). This script rescores them with
SmolLM2-135M-Instruct (``models/smollm2-135m-instruct``, which none of the arms trained on or from): the mean per-token
log-probability of the response given the prompt in the model's chat template, ``(1/|y|) sum_t log p(y_t | x, y_<t)``.
It measures fluency and relevance as a small instruction-tuned model sees them, not preference; its validity check is
printed beside it (the demonstrations must score above their own words shuffled, and both above the untrained
policy's token salad). Per-token means favour repetitive text; the share of distinct words (``distinct``) is printed
beside them so that a policy that repeats one word shows.

    python bench/aihf_lm_judge.py /tmp/aihf_rows.jsonl --model models/smollm2-135m-instruct --samples 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci(values: list[float]) -> str:
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.3f}"
    return f"{m:.3f} +- {T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5:.3f}"


def distinct(texts: list[str]) -> float:
    """Mean share of distinct words per response (1: no word repeats; empty responses count 0)."""
    return statistics.fmean(len(set(t.split())) / len(t.split()) if t.split() else 0.0 for t in texts)


class LMJudge:
    """Mean per-token log-probability of responses given prompts under a causal LM (chat template when it has one).

    Args:
        folder: HF model folder.
        prompt_tokens: keep the last this many prompt tokens.
        response_tokens: score at most the first this many response tokens.
        batch: rows per forward pass.
    """

    def __init__(self, folder: str, prompt_tokens: int = 96, response_tokens: int = 48, batch: int = 16) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.prompt_tokens, self.response_tokens, self.batch = prompt_tokens, response_tokens, batch
        self.cache: dict[tuple[str, str], float] = {}

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        if self.tok.chat_template:
            p = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
            if isinstance(p, dict) or hasattr(p, "keys"):
                p = p["input_ids"]
        else:
            p = self.tok(prompt, add_special_tokens=False)["input_ids"]
        r = self.tok(response, add_special_tokens=False)["input_ids"][: self.response_tokens]
        return list(p)[-self.prompt_tokens:], list(r)

    @torch.inference_mode()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        todo = [(p, r) for p, r in dict.fromkeys(zip(prompts, responses)) if (p, r) not in self.cache]
        for s in range(0, len(todo), self.batch):
            chunk = todo[s:s + self.batch]
            enc = [self.encode(p, r) for p, r in chunk]
            width = max(len(p) + len(r) for p, r in enc)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            resp = torch.zeros_like(ids, dtype=torch.bool)
            for i, (p, r) in enumerate(enc):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                att[i, : len(p) + len(r)] = 1
                resp[i, len(p): len(p) + len(r)] = True
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
            tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): log p(ids[t+1] | ids[:t+1])
            mask = resp[:, 1:].float()
            for (p, r), lp, m in zip(chunk, tok_lp, mask):
                self.cache[(p, r)] = float((lp * m).sum() / m.sum()) if m.sum() > 0 else float("nan")
        return [self.cache[(p, r)] for p, r in zip(prompts, responses)]


def first_samples(prompts: list[str], responses: list[str], per_prompt: int, keep: int) -> tuple[list, list]:
    """The first ``keep`` of the ``per_prompt`` samples of every prompt (rows are prompt-major)."""
    idx = [i for i in range(len(prompts)) if i % per_prompt < keep]
    return [prompts[i] for i in idx], [responses[i] for i in idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", help="aihf_evidence.py --out file (with its .refs.json beside it)")
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--samples", type=int, default=1, help="samples per prompt to score (of those saved)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="keep the last this many prompt tokens")
    ap.add_argument("--response-tokens", type=int, default=48, help="score the first this many response tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.time()
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    refs = json.loads(Path(args.rows + ".refs.json").read_text())
    prompts_all, per = refs["prompts"], refs["samples"]
    judge = LMJudge(args.model, prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens)
    print(f"LM judge {args.model}: mean log-prob per response token (first {judge.response_tokens} tokens, prompt in "
          f"the chat template, last {judge.prompt_tokens} prompt tokens); {min(args.samples, per)} sample(s) on each "
          f"of {len(prompts_all) // per} held-out prompts", flush=True)
    one = prompts_all[::per]
    for name, r in refs["references"].items():
        print(f"  reference {name}: lm {statistics.fmean(judge.score(one, r['responses'])):.3f}  "
              f"distinct {distinct(r['responses']):.3f}", flush=True)
    init = []
    for r in refs["initial"]:
        p, y = first_samples(prompts_all, r["responses"], per, args.samples)
        init.append((statistics.fmean(judge.score(p, y)), distinct(y)))
    print(f"  initial policy: lm {ci([a for a, _ in init])}  distinct {statistics.fmean(b for _, b in init):.3f}",
          flush=True)
    groups: dict[tuple[float, str], list[tuple[float, float]]] = {}
    for r in rows:
        p, y = first_samples(prompts_all, r["responses"], per, args.samples)
        groups.setdefault((r["fraction"], r["method"]), []).append((statistics.fmean(judge.score(p, y)), distinct(y)))
    print(f"\n{'pairs':>6} {'method':<16} {'lm log-prob/token':>18} {'distinct':>8}  "
          "(mean +- 95% t-interval over seeds)")
    for (fraction, method), v in groups.items():
        print(f"{fraction:>6.0%} {method:<16} {ci([a for a, _ in v]):>18} {statistics.fmean(b for _, b in v):>8.3f}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
