"""The static-cache rollout engine against independent references: HF's logits warpers, HF ``generate`` (greedy),
a full forward pass (log-probs), empirical sampling frequencies, and the PPO module with the engine switched on."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.rollout.engine import (
    StaticCacheGenerator,
    build_generator,
    counter_uniform,
    filter_logits,
    sample_tokens,
)
from lightning_rlhf.rollout.generation import Generator, HFGenerator
from lightning_rlhf.rollout.scoring import position_ids_from_attention_mask

# special ids of conftest's tiny_llama fixture and the left-padding helper of the HF-generator tests
from tests.test_generation import BOS, EOS, PAD, _left_pad

pytestmark = pytest.mark.usefixtures("single_thread")


def _prompts(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [[BOS] + torch.randint(3, 64, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return _left_pad(rows, max(len(r) for r in rows))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (0, 0.3), (7, 0.8), (1, 1.0)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def test_sample_tokens_frequencies_follow_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf"), 0.5])
    n = 200_000
    draws = sample_tokens(logits.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    expected = logits.double().softmax(-1)
    assert freq[4] == 0  # a -inf entry is never drawn
    # binomial standard error is at most sqrt(0.25 / n) ~ 0.0011: allow 5 of them
    torch.testing.assert_close(freq, expected, atol=0.0056, rtol=0)
    # seeded: the same generator state gives the same draws
    a = sample_tokens(logits.expand(64, -1), torch.Generator().manual_seed(5))
    b = sample_tokens(logits.expand(64, -1), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_matches_hf_generate_with_left_padding_and_eos(tiny_llama, cache):
    ids, mask = _prompts(12)
    # pick an EOS the model actually emits, so some rows stop early and some do not
    probe = HFGenerator(max_new_tokens=10, do_sample=False, eos_token_id=63, pad_token_id=PAD)
    eos = int(probe.generate(tiny_llama, ids, mask).sequences[0, ids.shape[1] + 3])
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    ref = HFGenerator(**kw).generate(tiny_llama, ids, mask)
    ours = StaticCacheGenerator(cache=cache, prompt_bucket=1, **kw).generate(tiny_llama, ids, mask)
    assert isinstance(StaticCacheGenerator(), Generator)
    assert ref.stopped_by_eos.any()
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.equal(ours.action_mask, ref.action_mask)
    assert torch.equal(ours.attention_mask, ref.attention_mask)
    assert torch.equal(ours.stopped_by_eos, ref.stopped_by_eos)
    assert ours.prompt_length == ref.prompt_length
    assert tiny_llama.training  # train mode restored


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 10)])
def test_rollout_logprobs_equal_a_full_forward(tiny_llama, temperature, top_k):
    ids, mask = _prompts(9, seed=1)
    gen = StaticCacheGenerator(max_new_tokens=12, temperature=temperature, top_k=top_k, eos_token_id=EOS,
                               pad_token_id=PAD)
    out = gen.generate(tiny_llama, ids, mask, seed=11)
    assert out.logprobs is not None and out.logprobs.shape == out.action_mask.shape
    P = out.prompt_length
    tiny_llama.eval()
    with torch.no_grad():
        logits = tiny_llama(input_ids=out.sequences, attention_mask=out.attention_mask,
                            position_ids=position_ids_from_attention_mask(out.attention_mask)).logits
    tiny_llama.train()
    full = (logits[:, P - 1 : -1].float() / temperature).log_softmax(-1)
    expected = full.gather(-1, out.sequences[:, P:, None]).squeeze(-1) * out.action_mask
    torch.testing.assert_close(out.logprobs, expected, atol=1e-5, rtol=0)
    if top_k:  # every sampled token is inside the top-k set of its step
        kth = torch.topk(full, top_k, dim=-1).values[..., -1]
        chosen = full.gather(-1, out.sequences[:, P:, None]).squeeze(-1)
        assert bool(((chosen >= kth) | (out.action_mask == 0)).all())


def test_seeding_is_reproducible_and_leaves_the_global_rng_alone(tiny_llama):
    ids, mask = _prompts(6, seed=2)
    gen = StaticCacheGenerator(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = gen.generate(tiny_llama, ids, mask, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = gen.generate(tiny_llama, ids, mask, seed=7)
    c = gen.generate(tiny_llama, ids, mask, seed=8)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    # a base seed gives a different (but reproducible) stream per call
    g1 = StaticCacheGenerator(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, seed=3)
    g2 = StaticCacheGenerator(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, seed=3)
    assert torch.equal(g1.generate(tiny_llama, ids, mask).sequences, g2.generate(tiny_llama, ids, mask).sequences)


def test_counter_uniform_is_uniform_and_a_pure_function_of_seed_and_step():
    seeds = torch.arange(50_000, dtype=torch.long) * 7_919 + 12_345
    draws = torch.stack([counter_uniform(seeds, t) for t in range(4)])  # (4, N)
    assert float(draws.min()) >= 0 and float(draws.max()) < 1
    # 200k draws: decile shares within 5 standard errors (sqrt(0.09 / 200k) ~ 0.00067) of 0.1
    shares = torch.histc(draws, bins=10, min=0, max=1) / draws.numel()
    torch.testing.assert_close(shares, torch.full((10,), 0.1), atol=0.0034, rtol=0)
    assert abs(float(torch.corrcoef(draws[:2])[0, 1])) < 0.02  # consecutive steps
    assert abs(float(torch.corrcoef(torch.stack([draws[0, :-1], draws[0, 1:]]))[0, 1])) < 0.02  # neighbouring seeds
    assert torch.equal(counter_uniform(seeds[7:9], 2), draws[2, 7:9])  # no state: same (seed, step), same draw
    counter_uniform(torch.tensor([2**63 - 1, 0]), 10**6)  # the whole seed range works


def test_row_seeds_make_each_row_independent_of_the_rest_of_the_batch(tiny_llama):
    prompt = [BOS, 11, 12, 13]
    gen = StaticCacheGenerator(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, top_k=20,
                               pad_to_max_new_tokens=True)
    alone = gen.generate(tiny_llama, *_left_pad([prompt], 4), row_seeds=torch.tensor([99]))
    batched = gen.generate(tiny_llama, *_left_pad([[BOS, 20, 21, 22, 23, 24, 25], prompt, [BOS, 30]], 7),
                           row_seeds=torch.tensor([5, 99, 6]))
    assert torch.equal(batched.sequences[1, 7:], alone.sequences[0, 4:])
    other = gen.generate(tiny_llama, *_left_pad([prompt, prompt], 4), row_seeds=torch.tensor([99, 100]))
    assert torch.equal(other.sequences[0], alone.sequences[0])
    assert not torch.equal(other.sequences[1], alone.sequences[0])
    with pytest.raises(ValueError, match="row_seeds must have shape"):
        gen.generate(tiny_llama, *_left_pad([prompt], 4), row_seeds=torch.tensor([1, 2]))


def test_static_cache_pads_prompts_to_a_bucket_and_decodes_the_same(tiny_llama):
    ids, mask = _prompts(5, seed=6)  # width 9 at most: padded to 16 columns
    kw = dict(max_new_tokens=7, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, pad_to_max_new_tokens=True)
    plain = StaticCacheGenerator(cache="dynamic", **kw).generate(tiny_llama, ids, mask)
    bucketed = StaticCacheGenerator(cache="static", prompt_bucket=16, **kw).generate(tiny_llama, ids, mask)
    assert bucketed.prompt_length == 16 and bucketed.sequences.shape[1] == 16 + 7
    assert torch.equal(bucketed.sequences[:, 16:], plain.sequences[:, plain.prompt_length:])
    assert torch.equal(bucketed.action_mask, plain.action_mask)
    assert torch.equal(bucketed.attention_mask[:, 16 - ids.shape[1]:], plain.attention_mask)
    assert int(bucketed.attention_mask[:, : 16 - ids.shape[1]].sum()) == 0


def test_early_exit_and_width(tiny_llama):
    ids, mask = _prompts(4, seed=4)
    # every token is an EOS: all rows stop at their first token, and the loop stops at the first check
    every = list(range(64))
    out = StaticCacheGenerator(max_new_tokens=20, eos_token_id=every, pad_token_id=PAD, check_every=1).generate(
        tiny_llama, ids, mask, seed=0)
    assert out.action_mask.shape == (4, 1) and bool(out.stopped_by_eos.all())
    padded = StaticCacheGenerator(max_new_tokens=20, eos_token_id=every, pad_token_id=PAD,
                                  pad_to_max_new_tokens=True).generate(tiny_llama, ids, mask, seed=0)
    assert padded.action_mask.shape == (4, 20)
    assert padded.action_mask.sum(-1).tolist() == [1, 1, 1, 1]
    assert bool((padded.sequences[:, ids.shape[1] + 1 :] == PAD).all())
    assert bool((padded.logprobs[:, 1:] == 0).all())


def test_bad_arguments_and_right_padding_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticCacheGenerator(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        StaticCacheGenerator(top_p=0.0)
    with pytest.raises(ValueError, match="compile=True needs cache='static'"):
        StaticCacheGenerator(compile=True, cache="dynamic")
    with pytest.raises(ValueError, match="rollout engine"):
        build_generator("vllm")
    assert isinstance(build_generator("hf", compile=True), HFGenerator)
    ids = torch.tensor([[BOS, 5, PAD]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        StaticCacheGenerator(eos_token_id=EOS).generate(tiny_llama, ids, torch.tensor([[1, 1, 0]]))


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tiny_llama):
    ids, mask = _prompts(4, seed=5)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    eager = StaticCacheGenerator(**kw).generate(tiny_llama, ids, mask)
    compiled = StaticCacheGenerator(compile=True, **kw).generate(tiny_llama, ids, mask)
    assert compiled.prompt_length == 64  # the static cache pads prompts to a bucket of 64 columns
    assert torch.equal(eager.sequences[:, eager.prompt_length:], compiled.sequences[:, compiled.prompt_length:])
    torch.testing.assert_close(eager.logprobs, compiled.logprobs, atol=1e-5, rtol=0)


def test_ppo_reuses_rollout_logprobs(tmp_path):
    """PPO with the static engine: reused sampler log-probs equal the recomputed ones on the same samples."""
    from lightning_rlhf.methods import PPOModule

    common = dict(model_name_or_path="builtin:tiny-llama", reward_fn={
        "class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}},
        max_new_tokens=8, rollout_engine="static", seed=0)
    with pytest.raises(ValueError, match="rollout_engine: static"):
        PPOModule(model_name_or_path="builtin:tiny-llama", reward_fn=common["reward_fn"], reuse_rollout_logprobs=True)
    mods = []
    for reuse in (False, True):
        torch.manual_seed(0)
        m = PPOModule(reuse_rollout_logprobs=reuse, **common)
        m.build_models()
        mods.append(m)
    mods[1].load_state_dict(mods[0].state_dict())
    tok = mods[0].tokenizer
    rows = [tok("Human: hello there", add_special_tokens=False).input_ids,
            tok("Human: what is the weather like today", add_special_tokens=False).input_ids]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    batch = type("B", (), dict(input_ids=ids, attention_mask=mask, prompt_ids=["a", "b"], prompts=["x", "y"],
                                domains=["d", "d"], domain_ids=torch.zeros(2, dtype=torch.long)))()
    recomputed, reused = (m.make_experience(batch) for m in mods)
    assert torch.equal(recomputed.sequences, reused.sequences)
    torch.testing.assert_close(reused.logprobs, recomputed.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(reused.ref_logprobs, recomputed.ref_logprobs)
