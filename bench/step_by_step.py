"""Distilling step by step on the tweets: does a student need fewer labels when it also learns
the teacher's rationales?

    python bench/step_by_step.py [--pool 512] [--fractions 0.125 0.25 0.5 1] [--resume] [--table-only]

* Teacher: SmolLM2-135M-Instruct, few-shot chain of thought (three hand-written
  demonstrations, ``compactor.task.step_by_step.DEMOS``), greedy, 48 new tokens. Its own
  accuracy is measured first on ``tweets:dev`` (label parsed from its answer; no answer counts
  as wrong) and by scoring the three labels after its rationale.
* Rationales for the first ``--pool`` texts of ``tweets:train`` (cached, resumable).
* Student: SmolLM2 with every other layer (15 of 30), initialized from the teacher.
* Rows: at each fraction of the pool, label-only fine-tuning (gold labels), label-only KD (the
  teacher's distribution over the labels after its rationale) and step by step (gold label +
  rationale, α = 0.5), each scored on the first ``--test`` texts of ``tweets:test`` by the
  most likely label after ``predict:``.

Settings were fixed before any score was seen. Rows are saved to
bench/results/step_by_step.json as they finish (``--resume`` skips them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from _common import RESULTS, prov_ref, provenance, provenance_lines, stored_rows, write_result

from compactor.data.labeled import load_labeled
from compactor.io import home
from compactor.models.load import load_model
from compactor.task.metrics import scores
from compactor.task.step_by_step import (StepByStepConfig, fewshot_prompt, generate_rationales, label_logprobs,
                                         train_student)

JSON = RESULTS / "step_by_step.json"
MODES = ("label", "kd", "rationale")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=512)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows = stored_rows(JSON, args.resume or args.table_only)
    if args.table_only:
        return render(rows)
    prov = provenance()
    work = home() / "bench" / "step_by_step"
    teacher = load_model("smollm2-135m")
    tok = teacher.tokenizer
    tok.pad_token = tok.pad_token or tok.eos_token
    names = load_labeled("tweets:train").names
    train, dev, test = (load_labeled(f"tweets:{s}") for s in ("train", "dev", "test"))
    done = {(r["mode"], r["fraction"]) for r in rows}

    if ("teacher", 0.0) not in done:  # the teacher's own accuracy, on dev
        n = min(args.test, len(dev))
        gen = generate_rationales(teacher.model, tok, dev.texts[:n], names, work / "dev-rationales.jsonl",
                                  progress=True)
        parsed = torch.tensor([names.index(g["teacher_label"]) if g["teacher_label"] else -1 for g in gen])
        soft = _teacher_soft(teacher.model, tok, dev.texts[:n], gen, names)
        gold = torch.tensor(dev.labels[:n])
        rows.append({"mode": "teacher", "fraction": 0.0, "prov": prov, "examples": n,
                     "answered": float((parsed >= 0).float().mean()),
                     "parsed": scores(parsed.clamp_min(0), gold, names) | {"accuracy": float((parsed == gold).float().mean())},
                     "scored": scores(soft.argmax(-1), gold, names)})
        JSON.write_text(json.dumps(rows, indent=1))
    pool = train.texts[:args.pool]
    t0 = time.perf_counter()
    gen = generate_rationales(teacher.model, tok, pool, names, work / "train-rationales.jsonl", progress=True)
    rationale_s = time.perf_counter() - t0
    soft = _teacher_soft(teacher.model, tok, pool, gen, names)
    from compactor.distill.student import build_student

    base = build_student(teacher.model, "layers:every-other", adapter=teacher.adapter, progress=False).model
    n_test = min(args.test, len(test))
    gold = torch.tensor(test.labels[:n_test])
    for frac in args.fractions:
        k = max(1, round(frac * len(pool)))
        for mode in MODES:
            if (mode, frac) in done:
                continue
            student = copy.deepcopy(base)
            t1 = time.perf_counter()
            rec = train_student(student, tok, pool[:k], train.labels[:k], names, StepByStepConfig(mode=mode),
                                rationales=[g["rationale"] for g in gen[:k]], soft=soft[:k], progress=True)
            secs = time.perf_counter() - t1
            pred = label_logprobs(student, tok, test.texts[:n_test], names).argmax(-1)
            rows.append({"mode": mode, "fraction": frac, "examples": k, "prov": prov, "seconds": round(secs, 1),
                         "load_before": os.getloadavg()[0], "config": rec["config"],
                         "final_loss": rec["log"][-1], "test": scores(pred, gold, names),
                         "rationale_seconds": round(rationale_s, 1)})
            JSON.write_text(json.dumps(rows, indent=1))
            print(f"{mode} @ {frac}: accuracy {rows[-1]['test']['accuracy']:.4f}", flush=True)
    render(rows)


def _teacher_soft(model, tok, texts, gen, names) -> torch.Tensor:
    """The teacher's distribution over the labels after its own rationale ``[N, labels]``."""
    by_text = {g["text"]: g["rationale"] for g in gen}
    logp = label_logprobs(model, tok, texts, names, max_length=1024, batch=4,
                          prompt=lambda t: fewshot_prompt(t, names) + " " + by_text[t] + "\nSentiment:")
    return torch.softmax(logp, -1)


def render(rows: list[dict]) -> None:
    t = next((r for r in rows if r["mode"] == "teacher"), None)
    head = ""
    if t:
        head = (f"Teacher (SmolLM2-135M-Instruct, few-shot CoT) on {t['examples']} dev tweets: answered "
                f"{t['answered']:.3f}; parsed-answer accuracy {t['parsed']['accuracy']:.4f}; label scored after "
                f"its rationale: accuracy {t['scored']['accuracy']:.4f}, macro-F1 {t['scored']['macro_f1']:.4f}.\n\n")
    lines = ["| fraction of the pool | texts | mode | test accuracy | test macro-F1 | train s | run |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["mode"] != "teacher"), key=lambda r: (r["fraction"], MODES.index(r["mode"]))):
        lines.append(f"| {r['fraction']} | {r['examples']} | {r['mode']} | {r['test']['accuracy']:.4f} "
                     f"| {r['test']['macro_f1']:.4f} | {r['seconds']:.0f} | {prov_ref(rows, r)} |")
    body = (head + "Student: SmolLM2 with every other layer; modes: label = gold labels only, kd = the "
            "teacher's label distribution, rationale = gold label + the teacher's rationale (α = 0.5).\n\n"
            + "\n".join(lines) + "\n\nRuns:\n" + provenance_lines(rows))
    write_result("step_by_step", "Distilling step by step on the tweets (SmolLM2)", body)


if __name__ == "__main__":
    main()
