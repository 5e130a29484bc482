"""Distillation on the real model: a half-depth SmolLM2 student, four objectives, one budget.

    python bench/distill.py [--tokens 131072] [--rows ce,kd,kd+hidden,gjsd] [--resume]

The student is SmolLM2-135M with 15 of its 30 decoder layers removed (the 15 lowest
block-influence layers, measured on 32 windows of the Austen calibration split). Each row
trains a fresh copy of that student on the Austen training split for the same number of
tokens (same windows, same order, same optimizer and schedule) with:

  ce         cross-entropy on the text only (the baseline)
  kd         ½ CE + ½ forward KL to the live teacher (T = 1)
  kd+hidden  kd + relative hidden-state MSE (each student layer vs the teacher layer it replaces)
  gjsd       generalized JSD (β = ½) to the teacher, no CE

PPL, and KLD / top-1 against the teacher, are measured before and after on the Austen
evaluation split (never used for training or choices). tok/s counts training tokens per
second including the teacher's forward. Rows are appended to bench/results/distill.json as
they finish; a killed run continues from its trainer checkpoints with --resume.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from _common import RESULTS, prov_ref, provenance, provenance_lines, write_result

from compactor.data.windows import windows_for
from compactor.distill.config import DistillConfig
from compactor.distill.student import Student
from compactor.distill.teacher import LiveTeacher
from compactor.distill.trainer import Distiller
from compactor.models.load import load_model
from compactor.prune.cuts import choose_layers
from compactor.prune.structured import drop_layers

ROWS = {
    "ce": dict(ce=1.0, kl=0.0),
    "kd": dict(ce=0.5, kl=0.5),
    "kd+hidden": dict(ce=0.5, kl=0.5, hidden_mse=0.5),
    "gjsd": dict(ce=0.0, kl=0.0, gjsd=1.0, beta=0.5),
}
JSON = RESULTS / "distill.json"
WORK = Path(__file__).parent / "work" / "distill"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="only rewrite distill.md from distill.json")
    ap.add_argument("--speed-steps", type=int, default=0,
                    help="only measure training tok/s: this many steps of each row, back to back")
    a = ap.parse_args()
    done = {r["row"]: r for r in json.loads(JSON.read_text())} if (a.resume and JSON.exists()) else {}
    if a.table_only:
        return render(list(done.values()), a.lr)

    provenance()  # taken now: the code this process runs
    teacher = load_model("smollm2-135m")
    tok = teacher.tokenizer
    calib = windows_for(tok, "austen:calib", 512, max_tokens=32 * 512)
    n = teacher.model.config.num_hidden_layers
    dropped = choose_layers(teacher.model, calib, n // 2, "block_influence", teacher.adapter)
    kept = [i for i in range(n) if i not in dropped]
    print("dropping layers", dropped)
    ids = windows_for(tok, "austen:train", 256).input_ids
    ev = windows_for(tok, "austen:eval", 256, max_tokens=a.eval_tokens)

    if a.speed_steps:
        return speed_only(teacher, dropped, kept, ids, a)
    rows = list(done.values())
    for name in a.rows.split(","):
        if name in done:
            continue
        student = copy.deepcopy(teacher.model)
        drop_layers(student, dropped, teacher.adapter)
        cfg = DistillConfig(**ROWS[name], tokens=a.tokens, window=256, batch=8, micro_batch=4, lr=a.lr,
                            precision=a.precision, checkpoint_every=8, eval_tokens=a.eval_tokens)
        work = WORK / name
        tr = Distiller(Student(student, kept), LiveTeacher(teacher.model, cfg.precision != "fp32"), cfg, ids,
                       work, teacher_model=teacher.model, eval_windows=ev)
        res = tr.train(resume=work.exists())
        before = next((r["before"] for r in rows if "before" in r), None) or res.evals[0]
        row = {"row": name, "losses": ROWS[name], "tokens": res.tokens, "steps": res.steps, "lr": a.lr,
               "train_seconds": round(res.seconds, 1),
               # two throughputs, each labelled: training tokens over the run's wall time
               # (evaluations and checkpoint writes included), and over optimizer steps only
               "tok_s_wall": round(res.tokens / res.seconds, 1), "tok_s_step": round(res.tokens_per_s, 1),
               "precision": "bf16" if tr.autocast else "fp32", "resumed_from": res.resumed_from,
               "params": sum(p.numel() for p in student.parameters()),
               "before": before, "after": res.evals[-1], "dropped": dropped,
               "teacher_params": sum(p.numel() for p in teacher.model.parameters()), "layers": n,
               "selection_windows": len(calib), "window": cfg.window, "batch": cfg.batch,
               "warmup": cfg.warmup, "schedule": "linear warm-up + cosine",
               "checkpoint_every": cfg.checkpoint_every, "eval_tokens": a.eval_tokens,
               "prov": provenance()}
        rows.append(row)
        JSON.write_text(json.dumps(rows, indent=1))
        print(name, row["after"], row["tok_s"], flush=True)
        del tr, student

    render(rows, a.lr)


def render(rows: list[dict], lr: float) -> None:
    """Write bench/results/distill.md from the rows (every figure from a recorded field; rows
    recorded before a field existed say "not recorded")."""
    ce = next((r for r in rows if r["row"] == "ce"), None)
    b, r0 = rows[0]["before"], rows[0]
    nr = "not recorded"
    tparams = f"{r0['teacher_params']:,}" if "teacher_params" in r0 else nr
    layers = r0.get("layers", nr)
    lines = [f"Teacher: SmolLM2-135M-Instruct (dequantized bundled GGUF), {tparams} "
             f"params, PPL {b['teacher_ppl']:.2f} on {b['tokens']:,} Austen eval tokens.  ",
             f"Student: layers {r0['dropped']} dropped ({len(r0['dropped'])} of {layers}, lowest block "
             f"influence on {r0.get('selection_windows', nr)} calibration windows), "
             f"{r0['params']:,} params; before training PPL {b['ppl']:.2f}, KLD {b['kld']:.3f}, "
             f"top-1 {100 * b['top1']:.1f} %.  ",
             f"Budget per row: {r0['tokens']:,} training tokens (Austen train split, "
             f"{r0.get('window', nr)}-token windows, batch {r0.get('batch', nr)}, AdamW lr {r0.get('lr', lr)}, "
             f"{r0.get('warmup', nr)} warm-up steps, {r0.get('schedule', 'schedule ' + nr)}), "
             f"{r0['precision']} autocast.", "",
             "| objective | PPL after | KLD vs teacher after | top-1 after | KLD / CE-only "
             "| tok/s, wall time | tok/s, optimizer steps | wall | run |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| (student before training) | {b['ppl']:.2f} | {b['kld']:.3f} | {100 * b['top1']:.1f} % "
             "| — | — | — | — | |"]
    for r in rows:
        aft = r["after"]
        ratio = f"{aft['kld'] / ce['after']['kld']:.2f}" if ce else "—"
        step = f"{r['tok_s_step']:.0f}" if "tok_s_step" in r else nr
        lines.append(f"| {r['row']} | {aft['ppl']:.2f} | {aft['kld']:.3f} | {100 * aft['top1']:.1f} % | {ratio} "
                     f"| {r['tokens'] / r['train_seconds']:.0f} | {step} | {r['train_seconds'] / 60:.1f} min "
                     f"| {prov_ref(rows, r) or nr} |")
    lines += ["", "tok/s, wall time: training tokens over the row's whole wall time, which includes its "
              "before/after evaluations and checkpoint writes. tok/s, optimizer steps: the same tokens "
              "over the time spent in optimizer steps only. `distill_speed.md` has the step throughput "
              "of each objective measured back to back in one process (the ratios there are the "
              "comparable figure on this shared machine)."]
    notes = [f"* {r['row']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Conditions:", ""] + notes
    runs = provenance_lines(rows)
    lines += ["", "Runs:", "", runs or "- rows recorded before per-row provenance (see the git history "
              "of distill.json)"]
    write_result("distill", "Distillation: half-depth SmolLM2 student, CE vs KD vs KD+hidden vs GJSD",
                 "\n".join(lines))


def speed_only(teacher, dropped, kept, ids, a) -> None:
    """Training tok/s of every row (and fp32 vs bf16 for kd), measured back to back in one
    process on the same windows: the ratios are the figure, the machine being shared."""
    out = {}
    for name, prec in [(r, a.precision) for r in a.rows.split(",")] + [("kd", "fp32")]:
        student = copy.deepcopy(teacher.model)
        drop_layers(student, dropped, teacher.adapter)
        cfg = DistillConfig(**ROWS[name], tokens=(a.speed_steps + 1) * 8 * 256, window=256, batch=8, micro_batch=4,
                            lr=a.lr, precision=prec, checkpoint_every=0, eval_tokens=0)
        with tempfile.TemporaryDirectory() as work:
            tr = Distiller(Student(student, kept), LiveTeacher(teacher.model, prec != "fp32"), cfg, ids, work,
                           teacher_model=teacher.model, progress=False)
            tr.train_step()  # warm-up step, not timed
            t0 = time.perf_counter()
            for _ in range(a.speed_steps):
                tr.train_step()
            out[f"{name} ({'bf16' if tr.autocast else 'fp32'})"] = a.speed_steps * 8 * 256 / (time.perf_counter() - t0)
        print(out, flush=True)
    base = out[next(iter(out))]
    lines = ["| objective (precision) | train tok/s | ratio to the first row |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {v / base:.2f} |" for k, v in out.items()]
    write_result("distill_speed", "Distillation training speed, half-depth SmolLM2 student",
                 f"{a.speed_steps} steps of 8 × 256 tokens per row after one warm-up step, rows back to back "
                 "in one process (tok/s counts training tokens and includes the teacher's forward).\n\n"
                 + "\n".join(lines))


if __name__ == "__main__":
    main()
