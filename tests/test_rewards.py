"""Reward sources: a reward model with its own tokenizer scores exactly the ids its preference data gave it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_rlhf.data import PreferenceDataModule
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.rewards import ModelReward, RewardInput
from lightning_rlhf.rollout.experience import Experience

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "lightning_rlhf" / "assets" / "tokenizer"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama reward model whose tokenizer differs from the policy's: a chat template, and a pad token of its
    own (pad != eos; the vocabulary gains one token)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.chat_template = CHAT_TEMPLATE
    assert tok.pad_token_id != tok.eos_token_id
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    path = tmp_path_factory.mktemp("rm_own_tokenizer")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _preference_ids(rm_dir: Path, tmp_path: Path, prompts: list[str], responses: list[str],
                    max_length: int = 2048) -> list[list[int]]:
    """The ``chosen`` ids ``PreferenceDataModule`` builds on the reward model's tokenizer for these pairs."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": "no"}) + "\n"
                            for p, r in zip(prompts, responses)))
    dm = PreferenceDataModule(train_path=str(path), val_path=str(path), tokenizer_name_or_path=str(rm_dir),
                              max_length=max_length, max_prompt_length=max_length - 1, batch_size=len(prompts))
    dm.setup("fit")
    return [list(dm.train_dataset[i]["chosen_ids"]) for i in range(len(prompts))]


class _Recorder(torch.nn.Module):
    """Passes calls through to the reward model and keeps the ids it was given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return self.model(input_ids, attention_mask)


def test_ppo_scores_the_ids_the_preference_data_module_makes(rm_dir, tmp_path):
    module = PPOModule(model_name_or_path="builtin:tiny-llama", reward_model_name_or_path=str(rm_dir),
                       critic="shared", max_new_tokens=8, log_samples_every_n=0, export_dir=None)
    module.configure_model()
    source = module.reward_source
    assert isinstance(source, ModelReward) and source.tokenizer is not None  # another vocabulary: re-encoded
    rm_tok = source.tokenizer
    assert rm_tok.chat_template and rm_tok.pad_token_id != rm_tok.eos_token_id
    # the RM config's pad id is its own tokenizer's, not the policy's (scores are read at the last non-pad token)
    assert module.reward_model.config.pad_token_id == rm_tok.pad_token_id

    pol = module.tokenizer
    prompts = ["How do I bake bread?", "Tell me a joke about cats, please.", "Hi", "What is the capital of France?"]
    responses = [" Mix flour and water.", " A cat walked into a bar.", " Hello there, friend", " Paris"]
    ended = [True, True, False, True]  # row 2 hit max_new_tokens without EOS
    prompt_ids = [pol(p)["input_ids"] for p in prompts]
    resp_ids = [pol(r, add_special_tokens=False)["input_ids"] + ([pol.eos_token_id] if e else [])
                for r, e in zip(responses, ended)]
    P, R = max(map(len, prompt_ids)), max(map(len, resp_ids))
    pad = pol.pad_token_id
    seqs = [[pad] * (P - len(p)) + p + r + [pad] * (R - len(r)) for p, r in zip(prompt_ids, resp_ids)]
    amask = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)) for p, r in zip(prompt_ids, resp_ids)]
    exp = Experience(sequences=torch.tensor(seqs), attention_mask=torch.tensor(amask),
                     action_mask=torch.tensor([m[P:] for m in amask]), prompt_length=P,
                     extras={"prompts": prompts, "prompt_ids": [f"id{i}" for i in range(4)], "domains": ["d"] * 4,
                             "stopped_by_eos": torch.tensor(ended)})
    recorder = _Recorder(source.model)
    source.model = recorder
    scores = module.score(exp)

    expected = _preference_ids(rm_dir, tmp_path, prompts, responses)
    # hand-built check of the data module's encoding: template on the prompt, response, EOS
    templ = rm_tok("<|user|>\n" + prompts[0] + "\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert expected[0] == templ + rm_tok(responses[0], add_special_tokens=False)["input_ids"] + [rm_tok.eos_token_id]
    ids, mask = recorder.calls[0]
    got = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert got[2] == expected[2][:-1]  # no EOS where the policy did not end its response
    assert (ids[~mask.bool()] == rm_tok.pad_token_id).all()
    # the scores equal the reward model's on the data module's ids (one row at a time, no padding)
    reward_model = module.reward_model
    want = torch.stack([reward_model(torch.tensor([e]), torch.ones(1, len(e), dtype=torch.long))[0]
                        for e in expected[:2] + [expected[2][:-1]] + expected[3:]])
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)


def test_reencoded_pairs_are_truncated_like_training_pairs(rm_dir, tmp_path):
    """Over the budget, the prompt loses its start first (truncate_pair), as in the reward model's training data."""
    from transformers import AutoTokenizer

    rm_tok = AutoTokenizer.from_pretrained(str(rm_dir))
    recorder = _Recorder(lambda ids, mask: ids.float().sum(-1))  # any callable: the ids are what is checked
    source = ModelReward(recorder, tokenizer=rm_tok, max_length=32)
    prompts = ["one two three four five six seven eight nine ten", "short prompt"]
    responses = [" the answer is long", " ok"]
    inp = RewardInput(sequences=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3),
                      prompt_length=1, action_mask=torch.ones(2, 2), prompts=prompts, responses=responses)
    source(inp)
    ids, mask = recorder.calls[0]
    got = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert got == _preference_ids(rm_dir, tmp_path, prompts, responses, max_length=32)
    full_prompt = rm_tok.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
    answer = rm_tok(responses[0], add_special_tokens=False)["input_ids"] + [rm_tok.eos_token_id]
    assert len(full_prompt) + len(answer) > 32  # the case is a truncation
    assert got[0] == full_prompt[len(full_prompt) + len(answer) - 32 :] + answer  # the prompt's start went, by hand
