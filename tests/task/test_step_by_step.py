"""Distilling step by step: prompt parsing, label scoring against a naive reference, cached
and resumable rationales, and the three training modes on a tiny LM (held-out, several seeds)."""

import random

import pytest
import torch

from compactor.errors import CompactorError
from compactor.models.tiny import tiny_model, tiny_tokenizer
from compactor.task.step_by_step import (StepByStepConfig, fewshot_prompt, generate_rationales, label_logprobs,
                                         parse_generation, predict_prompt, train_student)

NAMES = ("negative", "neutral", "positive")


def test_prompt_and_parsing():
    p = fewshot_prompt("what a day", NAMES)
    assert p.endswith("Tweet: what a day\nReasoning:") and p.count("Sentiment:") == 3
    assert parse_generation(" It is upbeat.\nSentiment: Positive\n\nTweet: x", NAMES) == ("It is upbeat.", "positive")
    assert parse_generation(" no idea\nSentiment: happy", NAMES) == ("no idea", None)
    assert parse_generation(" rambling without an answer", NAMES) == ("rambling without an answer", None)


def test_label_logprobs_equal_scoring_each_label_alone():
    torch.manual_seed(0)
    model, tok = tiny_model(seed=3).eval(), tiny_tokenizer()
    texts = ["ab cd", "a much longer text here"]
    got = label_logprobs(model, tok, texts, NAMES, batch=1)
    for i, t in enumerate(texts):
        for j, n in enumerate(NAMES):
            a = tok(predict_prompt(t), add_special_tokens=False)["input_ids"]
            b = tok(f" {n}\n", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([a + b])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            want = sum(float(lp[len(a) - 1 + k, b[k]]) for k in range(len(b)))
            assert got[i, j].item() == pytest.approx(want, abs=1e-4)


def test_rationales_are_cached_and_resumed(tmp_path):
    model, tok = tiny_model(seed=1).eval(), tiny_tokenizer()
    tok.pad_token = tok.pad_token or tok.eos_token or "<pad>"
    texts = [f"text {i}" for i in range(5)]
    first = generate_rationales(model, tok, texts[:3], NAMES, tmp_path / "r.jsonl", max_new_tokens=6, batch=2,
                                progress=False)
    calls = []
    orig = model.generate
    model.generate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    again = generate_rationales(model, tok, texts, NAMES, tmp_path / "r.jsonl", max_new_tokens=6, batch=2,
                                progress=False)
    assert again[:3] == first and len(again) == 5 and len(calls) == 1  # only the two new texts ran
    with pytest.raises(CompactorError, match="other texts"):
        generate_rationales(model, tok, ["other"], NAMES, tmp_path / "r.jsonl", progress=False)


def _toy(n, seed):
    """Label = which of three marker words the text holds."""
    rng = random.Random(seed)
    marks = ("bad", "meh", "yay")
    rows = []
    for _ in range(n):
        y = rng.randrange(3)
        words = [rng.choice(["the", "a", "of", "it", "on"]) for _ in range(4)]
        words.insert(rng.randrange(5), marks[y])
        rows.append((" ".join(words), y, f"it says {marks[y]}"))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_mode_learns_the_toy_on_held_out_texts(seed):
    tok = tiny_tokenizer()
    train, test = _toy(96, seed), _toy(60, 100 + seed)
    gold = torch.tensor([y for _, y, _ in test])
    for mode in ("label", "kd", "rationale"):
        model = tiny_model(seed=seed)
        before = float((label_logprobs(model, tok, [t for t, _, _ in test], NAMES).argmax(-1) == gold).float().mean())
        soft = torch.nn.functional.one_hot(torch.tensor([y for _, y, _ in train]), 3).float() * 0.8 + 0.2 / 3
        train_student(model, tok, [t for t, _, _ in train], [y for _, y, _ in train], NAMES,
                      StepByStepConfig(mode=mode, epochs=6, batch=16, lr=3e-3, seed=seed),
                      rationales=[r for _, _, r in train], soft=soft, progress=False)
        after = float((label_logprobs(model, tok, [t for t, _, _ in test], NAMES).argmax(-1) == gold).float().mean())
        assert after > max(before, 0.5), (mode, before, after)


def test_bad_inputs():
    model, tok = tiny_model(), tiny_tokenizer()
    with pytest.raises(CompactorError, match="one rationale per"):
        train_student(model, tok, ["a"], [0], NAMES, StepByStepConfig(mode="rationale"), progress=False)
    with pytest.raises(CompactorError, match="label distribution"):
        train_student(model, tok, ["a"], [0], NAMES, StepByStepConfig(mode="kd"), progress=False)
