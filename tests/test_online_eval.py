"""Held-out validation of online methods: logged at the configured interval, deterministic for fixed weights,
equal to a plain recomputation, summed (not averaged) over ranks, usable for checkpoint selection, with judges."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.methods.contrastive import ContrastivePPOModule
from lightning_rlhf.methods.online_eval import check_eval_rewards, summarize, validation_seed
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.rewards import TokenCountReward

TOKEN_REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}
SPACE_JUDGE = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": " "}}

pytestmark = pytest.mark.usefixtures("single_thread")


def _module(cls: type = PPOModule, **overrides: Any) -> PPOModule:
    kwargs: dict[str, Any] = dict(
        model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2, critic_lr=1e-3, kl_coef=0.01,
        ppo_epochs=1, mini_batch_size=4, micro_batch_size=4, max_new_tokens=8, log_samples_every_n=0,
        export_dir=None, seed=0, eval_rewards={"same": TOKEN_REWARD, "spaces": SPACE_JUDGE},
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def _data() -> PromptDataModule:
    return PromptDataModule(train_path="builtin:hh-rlhf", batch_size=4, val_batch_size=3, max_prompt_length=48,
                            skip_invalid_rows=True, max_train_rows=32, max_val_rows=6)


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, max_steps=-1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                    default_root_dir=tmp_path)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class _Record(Callback):
    """Keeps (iteration, metrics) after every validation pass that is not the sanity check."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, dict[str, float]]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.passes.append((pl_module.iteration, m))


def test_ppo_logs_validation_at_the_configured_interval(tmp_path):
    module = _module(max_iterations=4)
    logger = CSVLogger(tmp_path, name="csv")
    record = _Record()
    _trainer(tmp_path, val_check_interval=2, logger=logger, callbacks=[record], log_every_n_steps=1).fit(module, _data())
    assert [it for it, _ in record.passes] == [2, 4]
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    val_rows = [r for r in rows if r.get("val/score")]
    assert len(val_rows) == 2
    for _, m in record.passes:
        for key in ("val/score", "val/kl", "val/response_length", "val/no_eos_frac", "val/judge/spaces"):
            assert key in m, key
        assert m["val/judge/same"] == m["val/score"]  # a judge equal to the training reward scores the same
        domains = [k for k in m if k.startswith("val/score/")]
        assert domains  # per-domain means, weighted back to the overall mean below
    # the logged numbers are the ones written to the logger
    assert [float(r["val/score"]) for r in val_rows] == pytest.approx([m["val/score"] for _, m in record.passes])


def test_validation_is_deterministic_and_matches_a_plain_recomputation(tmp_path):
    """Two passes over the same weights agree exactly; the numbers equal a loop over rows that samples with the
    documented seeds, counts 'e' in the decoded text and sums the KL from full-vocabulary log-softmaxes."""
    module = _module(max_iterations=2)
    dm = _data()
    _trainer(tmp_path, limit_val_batches=0).fit(module, dm)  # move the policy away from the reference
    first = _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    module.generator._calls += 5  # call counters and the iteration must not matter
    module.iteration += 3
    second = _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    assert first == second
    assert first["val/kl"] != 0.0

    # independent recomputation, one row at a time where possible
    tok, count = module.tokenizer, TokenCountReward("e")
    scores, kls, lengths, spaces, by_domain, spaces_by_domain = [], [], [], [], {}, {}
    for batch in dm.val_dataloader():
        gen = module.generator.generate(module.policy, batch.input_ids, batch.attention_mask,
                                        seed=validation_seed(0, list(batch.prompt_ids)))
        P = gen.prompt_length
        for i in range(len(batch.prompts)):
            n = int(gen.action_mask[i].sum())
            resp = gen.sequences[i, P : P + n].tolist()
            text = tok.decode(resp, skip_special_tokens=True)
            s = count([batch.prompts[i]], [text])[0]
            scores.append(s)
            spaces.append(text.count(" "))
            spaces_by_domain.setdefault(batch.domains[i], []).append(text.count(" "))
            by_domain.setdefault(batch.domains[i], []).append(s)
            lengths.append(n)
            real = batch.attention_mask[i].bool()
            ids = torch.cat([batch.input_ids[i][real], torch.tensor(resp)])[None]
            with torch.no_grad():
                lp = torch.log_softmax(module.policy(ids).logits[0].double(), -1)
                ref = torch.log_softmax(module.reference(ids).logits[0].double(), -1)
            p0 = int(real.sum())
            tgt = ids[0, p0:]
            pos = torch.arange(p0 - 1, p0 - 1 + n)
            kls.append(float((lp[pos, tgt] - ref[pos, tgt]).sum()))
    assert first["val/score"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)  # logged as float32
    assert first["val/response_length"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-6)  # logged as float32
    assert first["val/kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-4)
    for d, vals in by_domain.items():
        assert first[f"val/score/{d}"] == pytest.approx(sum(vals) / len(vals), rel=1e-6)  # logged as float32
        sp = spaces_by_domain[d]
        assert first[f"val/judge/spaces/{d}"] == pytest.approx(sum(sp) / len(sp), rel=1e-6)
    assert first["val/judge/spaces"] == pytest.approx(sum(spaces) / len(spaces), rel=1e-6)  # logged as float32  # same texts, 2nd judge


def test_model_checkpoint_on_val_score_keeps_the_best(tmp_path):
    torch.manual_seed(0)  # the critic's fresh head: the same run whatever ran before
    module = _module(max_iterations=5, lr=2e-1)
    record = _Record()
    # save_on_train_epoch_end=False: with val_check_interval=1 (== 1.0) Lightning would otherwise save at the end of
    # the training epoch only, with the last pass's val/score
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max", save_top_k=1,
                           save_on_train_epoch_end=False)
    trainer = _trainer(tmp_path, val_check_interval=1, enable_checkpointing=True, callbacks=[record, ckpt])
    trainer.fit(module, _data())
    logged = [(it, m["val/score"]) for it, m in record.passes]
    assert [it for it, _ in logged] == [1, 2, 3, 4, 5]
    best_it, best = max(logged, key=lambda x: x[1])  # first of equal maxima: ModelCheckpoint replaces only on a gain
    assert len({v for _, v in logged}) > 1 and best_it != logged[-1][0]  # not the last checkpoint: a real choice
    assert float(ckpt.best_model_score) == pytest.approx(best)
    kept = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(kept) == 1 and kept[0] == Path(ckpt.best_model_path)
    state = torch.load(kept[0], map_location="cpu", weights_only=False)
    assert state["iteration"] == best_it
    # the kept weights, validated again, give the logged best score
    fresh = _module()
    fresh.configure_model()
    fresh.load_state_dict(state["state_dict"], strict=False)
    again = _trainer(tmp_path).validate(fresh, datamodule=_data(), verbose=False)[0]
    assert again["val/score"] == pytest.approx(best, rel=1e-6)  # logged as float32


def test_contrastive_module_inherits_validation(tmp_path):
    module = _module(ContrastivePPOModule, max_iterations=1, baseline_path=str(tmp_path / "missing.jsonl"),
                     on_missing_baseline="fallback", eval_rewards=None)
    out = _trainer(tmp_path).validate(module, datamodule=_data(), verbose=False)[0]
    assert {"val/score", "val/kl", "val/response_length"} <= set(out)


def test_summaries_pool_rows_over_ranks():
    """Means over ranks are sums / counts of all rows, not means of per-rank means (fake 2-rank all-reduce)."""
    f = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    rank0 = {"count": f(1.0), "score": f(4.0), "kl": f(0.5), "length": f(3.0), "no_eos": f(1.0),
             "domain_count": f(1.0, 0.0), "domain_score": f(4.0, 0.0), "judges": f(2.0),
             "domain_judges": f(2.0, 0.0).reshape(1, 2)}
    rank1 = {"count": f(3.0), "score": f(6.0), "kl": f(1.5), "length": f(9.0), "no_eos": f(0.0),
             "domain_count": f(1.0, 2.0), "domain_score": f(0.0, 6.0), "judges": f(3.0),
             "domain_judges": f(1.0, 2.0).reshape(1, 2)}
    flat1 = torch.cat([rank1[k].reshape(-1) for k in rank1])
    out = summarize(rank0, ["a", "b"], ["j"], reduce_fn=lambda t: t + flat1)
    assert out["val/score"] == pytest.approx(10.0 / 4)  # not (4/1 + 6/3) / 2 = 3
    assert out["val/kl"] == pytest.approx(2.0 / 4) and out["val/response_length"] == pytest.approx(12.0 / 4)
    assert out["val/no_eos_frac"] == pytest.approx(0.25) and out["val/judge/j"] == pytest.approx(5.0 / 4)
    assert out["val/score/a"] == pytest.approx(4.0 / 2) and out["val/score/b"] == pytest.approx(6.0 / 2)
    assert out["val/judge/j/a"] == pytest.approx(3.0 / 2) and out["val/judge/j/b"] == pytest.approx(2.0 / 2)
    assert summarize({k: v * 0 for k, v in rank0.items()}, ["a", "b"], ["j"]) == {}


def test_bad_eval_rewards_fail_at_construction_naming_the_flag():
    with pytest.raises(ValueError, match="model.eval_rewards.gold"):
        _module(eval_rewards={"gold": {"init_args": {}}})
    with pytest.raises(ValueError, match="model.eval_rewards"):
        check_eval_rewards({"a/b": "some/path"})


def test_greedy_validation_ignores_the_seed_and_sampling_does_not(tmp_path):
    module = _module(eval_rewards=None, val_greedy=True)
    dm = _data()
    greedy = _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    module.evaluator.seed = 123
    assert _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0] == greedy
    # greedy decoding by hand (argmax continuation of each prompt alone) gives the same responses' score
    tok, count, scores = module.tokenizer, TokenCountReward("e"), []
    for batch in dm.val_dataloader():
        for i in range(len(batch.prompts)):
            ids = batch.input_ids[i][batch.attention_mask[i].bool()][None]
            for _ in range(module.generator.max_new_tokens):
                with torch.no_grad():
                    nxt = module.policy(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
                if int(nxt) == tok.eos_token_id:
                    break
            n_prompt = int(batch.attention_mask[i].sum())
            scores.append(count([""], [tok.decode(ids[0, n_prompt:], skip_special_tokens=True)])[0])
    assert greedy["val/score"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)
    sampled = [_trainer(tmp_path).validate(_module(eval_rewards=None, val_seed=s), datamodule=dm, verbose=False)[0]
               for s in (0, 1)]
    assert sampled[0]["val/score"] != sampled[1]["val/score"] or sampled[0]["val/kl"] != sampled[1]["val/kl"]


def test_static_engine_validation_seeds_each_prompt(tmp_path):
    """With the static engine every prompt draws from its own counter RNG: the same weights give the same numbers,
    and the same responses (so the same score) whatever the validation batch size."""
    module = _module(eval_rewards=None, rollout_engine="static")
    dm = _data()
    first = _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    assert _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0] == first
    dm_one = _data()
    dm_one.val_batch_size = 1  # no padding at all: each prompt sampled alone
    alone = _trainer(tmp_path).validate(module, datamodule=dm_one, verbose=False)[0]
    assert alone["val/score"] == pytest.approx(first["val/score"], rel=1e-6)
    assert alone["val/response_length"] == pytest.approx(first["val/response_length"], rel=1e-6)
