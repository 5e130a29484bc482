"""Distilling step by step for causal LMs (Hsieh et al., 2023, arXiv:2305.02301).

A teacher LM writes a rationale for each training text by few-shot chain-of-thought prompting
(:func:`generate_rationales`); a student LM learns two tasks from one set of weights:

    L = α · CE(label | "predict: " + x) + (1 − α) · CE(rationale | "explain: " + x)

and at test time only ``predict:`` runs, so the rationales cost nothing at inference. The
label is read by scoring: the label whose tokens the model finds most likely after the
prompt (:func:`label_logprobs`), so a model never "fails to answer". The baselines are
label-only fine-tuning (α = 1) and label-only KD, where the target is the teacher's
distribution over the labels (``soft``) instead of the gold label.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from compactor.config import StepConfig, check
from compactor.distill.checkpoint import step_indices
from compactor.errors import CompactorError

#: Hand-written demonstrations (invented texts, in no split) for the tweets' three labels.
DEMOS = (
    ("just got my exam results back and i passed everything!!", "The writer is excited about passing "
     "every exam, a clearly good outcome.", "positive"),
    ("the train is delayed again, third time this week. great.", "\"great\" is sarcastic: repeated "
     "delays are a complaint.", "negative"),
    ("the city council meets on tuesday to discuss the new budget", "It only reports a scheduled "
     "meeting, with no opinion or feeling.", "neutral"),
)


def fewshot_prompt(text: str, names: tuple[str, ...]) -> str:
    """The chain-of-thought prompt: demonstrations of (text, reasoning, label), then ``text``."""
    head = f"Classify the sentiment of each tweet as {', '.join(names)}. Think first, then answer.\n\n"
    demos = "".join(f"Tweet: {t}\nReasoning: {r}\nSentiment: {y}\n\n" for t, r, y in DEMOS)
    return head + demos + f"Tweet: {text}\nReasoning:"


def parse_generation(generated: str, names: tuple[str, ...]) -> tuple[str, str | None]:
    """(rationale, label or None) from the teacher's continuation of :func:`fewshot_prompt`."""
    block = generated.split("\n\n")[0]
    rationale, _, rest = block.partition("Sentiment:")
    m = re.match(r"\s*([A-Za-z]+)", rest)
    label = m.group(1).lower() if m else None
    return rationale.strip(), label if label in names else None


@torch.no_grad()
def generate_rationales(model, tokenizer, texts: list[str], names: tuple[str, ...], cache: Path,
                        max_new_tokens: int = 48, batch: int = 8, progress: bool = True) -> list[dict]:
    """Greedy rationales for ``texts``, appended to ``cache`` (JSONL) as they are made, so an
    interrupted run continues where it stopped. Rows: text, rationale, teacher label (None when
    the teacher gave none of ``names``)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    if any(r["text"] != t for r, t in zip(done, texts)):
        raise CompactorError(f"{cache}: cached rationales belong to other texts; remove it to start over")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues every prompt at the same position
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=len(texts), initial=len(done), desc="rationales", disable=not progress)
    try:
        with cache.open("a") as f:
            for s in range(len(done), len(texts), batch):
                chunk = texts[s:s + batch]
                enc = tokenizer([fewshot_prompt(t, names) for t in chunk], return_tensors="pt", padding=True)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
                for t, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                    rationale, label = parse_generation(tokenizer.decode(row, skip_special_tokens=True), names)
                    rec = {"text": t, "rationale": rationale, "teacher_label": label}
                    f.write(json.dumps(rec) + "\n")
                    done.append(rec)
                f.flush()
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return done


def _pairs(tokenizer, prompts: list[str], targets: list[str], max_length: int):
    """Right-padded ``ids [B, T]`` of prompt + target and the mask ``[B, T]`` of the target's
    tokens (the only positions scored)."""
    rows, marks = [], []
    for p, t in zip(prompts, targets):
        a = tokenizer(p, add_special_tokens=False)["input_ids"]
        b = tokenizer(t, add_special_tokens=False)["input_ids"]
        a = a[-max(1, max_length - len(b)):]  # keep the end of a long prompt: the question is there
        rows.append(a + b)
        marks.append([0] * len(a) + [1] * len(b))
    t = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    tgt = torch.zeros((len(rows), t), dtype=torch.bool)
    attn = torch.zeros((len(rows), t), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, marks)):
        ids[i, :len(r)] = torch.tensor(r)
        tgt[i, :len(r)] = torch.tensor(m, dtype=torch.bool)
        attn[i, :len(r)] = 1
    return ids, attn, tgt


def _target_logprob(model, ids, attn, tgt) -> torch.Tensor:
    """``[B]``: sum of log p(target tokens) under teacher forcing."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)    # [B, T-1]
    return (lp * tgt[:, 1:]).sum(-1)


def predict_prompt(text: str) -> str:
    return f"predict: {text}\nlabel:"


def explain_prompt(text: str) -> str:
    return f"explain: {text}\nrationale:"


def label_logprobs(model, tokenizer, texts: list[str], names: tuple[str, ...], max_length: int = 96,
                   batch: int = 16, grad: bool = False, prompt=predict_prompt) -> torch.Tensor:
    """``[N, labels]``: log p(" label\\n" | prompt(text)) of every label for every text (by
    default the student's ``predict:`` prompt; a teacher passes its few-shot prompt)."""
    out = []
    with torch.set_grad_enabled(grad):
        for s in range(0, len(texts), batch):
            chunk = texts[s:s + batch]
            prompts = [prompt(t) for t in chunk for _ in names]
            ids, attn, tgt = _pairs(tokenizer, prompts, [f" {n}\n" for _ in chunk for n in names], max_length)
            out.append(_target_logprob(model, ids, attn, tgt).reshape(len(chunk), len(names)))
    return torch.cat(out)


@dataclass(frozen=True)
class StepByStepConfig(StepConfig):
    """One student run: ``mode`` label (gold labels), kd (the teacher's label distribution) or
    rationale (gold labels + the teacher's rationales, weighted α / 1 − α)."""

    name = "step_by_step"
    mode: Literal["label", "kd", "rationale"] = "rationale"
    alpha: float = 0.5
    epochs: float = 2.0
    batch: int = 16
    lr: float = 5e-5
    max_length: int = 96
    seed: int = 0

    def validate(self) -> None:
        check(0.0 < self.alpha <= 1.0, f"step_by_step.alpha must be in (0, 1], got {self.alpha}")
        check(self.epochs > 0 and self.lr > 0 and self.batch >= 1, "step_by_step: epochs, lr and batch must be positive")


def train_student(model, tokenizer, texts: list[str], labels: list[int], names: tuple[str, ...],
                  cfg: StepByStepConfig, rationales: list[str] | None = None, soft: torch.Tensor | None = None,
                  progress: bool = True) -> dict:
    """Train ``model`` in place (see the module docstring); returns the loss log."""
    if cfg.mode == "rationale" and (rationales is None or len(rationales) != len(texts)):
        raise CompactorError("step-by-step training needs one rationale per training text")
    if cfg.mode == "kd" and (soft is None or soft.shape != (len(texts), len(names))):
        raise CompactorError("label KD needs the teacher's label distribution for every training text")
    if not texts:
        raise CompactorError("no training texts")
    steps = max(1, math.ceil(cfg.epochs * len(texts) / cfg.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    y = torch.tensor(labels)
    model.train()
    log = []
    for step in tqdm(range(steps), desc=f"step-by-step ({cfg.mode})", disable=not progress):
        idx = step_indices(len(texts), min(cfg.batch, len(texts)), step, cfg.seed).tolist()
        batch = [texts[i] for i in idx]
        opt.zero_grad(set_to_none=True)
        if cfg.mode == "kd":  # cross-entropy against the teacher's distribution over the labels
            lq = torch.log_softmax(label_logprobs(model, tokenizer, batch, names, cfg.max_length, grad=True), -1)
            label_loss = -(soft[idx] * lq).sum(-1).mean()
        else:
            ids, attn, tgt = _pairs(tokenizer, [predict_prompt(t) for t in batch],
                                    [f" {names[int(y[i])]}\n" for i in idx], cfg.max_length)
            label_loss = -(_target_logprob(model, ids, attn, tgt) / tgt.sum(-1)).mean()
        loss = cfg.alpha * label_loss if cfg.mode == "rationale" else label_loss
        rec = {"step": step + 1, "label": float(label_loss.detach())}
        if cfg.mode == "rationale":
            ids, attn, tgt = _pairs(tokenizer, [explain_prompt(t) for t in batch],
                                    [f" {rationales[i]}\n" for i in idx], cfg.max_length)
            rat_loss = -(_target_logprob(model, ids, attn, tgt) / tgt.sum(-1).clamp_min(1)).mean()
            loss = loss + (1 - cfg.alpha) * rat_loss
            rec["rationale"] = float(rat_loss.detach())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append(rec)
    model.eval()
    return {"steps": steps, "log": log, "config": cfg.to_dict()}
