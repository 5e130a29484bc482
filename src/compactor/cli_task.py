"""The task path on the command line (encoders with a classification head): ``finetune``, and
``distill`` / ``eval`` / ``export`` when given ``--task classify`` or a task model directory."""

from __future__ import annotations

from pathlib import Path

from compactor.cli_output import set_result
from compactor.errors import CompactorError

#: defaults of the task path where the LM path's flag defaults mean text, not labeled data
TASK_TRAIN, TASK_DEV, TASK_TEST = "tweets:train", "tweets:dev", "tweets:test"


def is_task_target(model: str, task: str | None) -> bool:
    """``--task classify`` given, or ``model`` is a task model directory / its ONNX graph."""
    from compactor.task.model import TASK_FILE, is_task_dir

    if task == "classify":
        return True
    p = Path(model)
    return (p.suffix == ".onnx" and (p.parent / TASK_FILE).exists()) or (p.is_dir() and is_task_dir(p))


def _train_config(args, epochs_default: float):
    from compactor.task.train import TaskTrainConfig

    kl, ce = getattr(args, "kl", None), getattr(args, "ce", None)
    if kl is not None and ce is not None and abs(kl + ce - 1) > 1e-9:
        raise CompactorError("for --task classify, --kl and --ce are α and 1 − α of α·T²·KL + (1 − α)·CE "
                             f"(they must sum to 1; got {kl} and {ce})")
    alpha = kl if kl is not None else (1 - ce if ce is not None else 0.0)
    keys = {"epochs": args.epochs or epochs_default, "alpha": alpha, "lr": args.lr, "batch": args.batch,
            "temperature": getattr(args, "temperature", None), "cosine": getattr(args, "hidden_cos", None),
            "attention": getattr(args, "attention", None), "max_length": args.window, "seed": args.seed,
            "checkpoint_every": args.checkpoint_every, "head_lr": getattr(args, "head_lr", None)}
    return TaskTrainConfig.from_dict({k: v for k, v in keys.items() if v is not None})


def _print_training(rec: dict, out) -> None:
    last = (rec.get("dev") or [{}])[-1]
    print(f"{rec['params']:,} params, {rec['steps']} steps in {rec['seconds']:.0f} s"
          + (f"; dev accuracy {last['accuracy']:.4f}, macro-F1 {last['macro_f1']:.4f}" if last else ""))
    print(f"wrote {out} (encoder, tokenizer, head.safetensors, task.json, task_run.json; training log in "
          f".{Path(out).name}.work until it completes)")


def cmd_finetune(args) -> int:
    from compactor.task.api import finetune

    if args.task != "classify":
        raise CompactorError("finetune supports --task classify")
    rec = finetune(args.model, args.data or TASK_TRAIN, args.eval_data or TASK_DEV, args.out,
                   _train_config(args, 2.0), resume=args.resume, overwrite=args.force)
    _print_training(rec, args.out)
    set_result(args, out_dir=str(args.out), training=rec)
    return 0


def cmd_task_distill(args) -> int:
    from compactor.task.api import distill_task

    if args.teacher_stream or args.lora_rank:
        raise CompactorError("--teacher-stream and --lora-rank are causal-LM options, not for --task classify")
    rec = distill_task(args.teacher, args.student, args.data or TASK_TRAIN,
                       TASK_DEV if args.eval_data in (None, "domains") else args.eval_data, args.out,
                       _train_config(args, 2.0), trim_vocab=args.trim_vocab, resume=args.resume,
                       overwrite=args.force)
    print(f"student: teacher layers {rec['layers']}"
          + (f", vocabulary {rec['vocabulary']['kept']:,} of {rec['vocabulary']['of']:,} tokens" if rec["vocabulary"] else ""))
    _print_training(rec, args.out)
    set_result(args, out_dir=str(args.out), training=rec)
    return 0


def cmd_task_eval(args) -> int:
    from compactor.task.api import eval_task

    data = TASK_TEST if args.eval_data == "domains" else args.eval_data
    res = eval_task(args.model, data, speed=not args.no_speed)
    print(f"{Path(args.model).name} ({res['runtime']}, {res['size_bytes'] / 1e6:.1f} MB) on {data}, "
          f"{res['examples']} examples: accuracy {res['accuracy']:.4f}, macro-F1 {res['macro_f1']:.4f}")
    print("per label F1: " + ", ".join(f"{k} {v:.4f}" for k, v in res["f1"].items()))
    print("confusion (rows gold, columns predicted; " + ", ".join(res["labels"]) + "):")
    for row in res["confusion"]:
        print("  " + " ".join(f"{x:6d}" for x in row))
    ref = None
    if args.reference:
        ref = eval_task(args.reference, data, speed=False)
        print(f"reference {Path(args.reference).name}: accuracy {ref['accuracy']:.4f}, macro-F1 {ref['macro_f1']:.4f}; "
              f"retention accuracy {res['accuracy'] / ref['accuracy']:.4f}, macro-F1 "
              f"{res['macro_f1'] / ref['macro_f1']:.4f}")
        res["reference"] = {k: ref[k] for k in ("model", "accuracy", "macro_f1")}
    if "latency" in res:
        lat = res["latency"]
        print(f"latency: batch-1 {lat['batch1_ms']:.2f} ms (median of {lat['batch1_examples']}), "
              f"batch-32 {lat['batch32_sent_s']:.0f} sentences/s")
    set_result(args, **res)
    return _task_gate(args, res, ref)


def _task_gate(args, res: dict, ref: dict | None) -> int:
    from compactor.errors import GateFailed
    from compactor.recipe.gates import Gate, check_task_gate, describe_failure

    gate = Gate(**{k: getattr(args, k) for k in ("max_kld", "max_ppl_ratio", "min_top1", "max_size_mb",
                                                 "max_bpw", "min_accuracy_retention")})
    if gate.empty:
        return 0
    checks = check_task_gate(gate, res, ref)
    if not all(c["passed"] for c in checks):
        raise GateFailed(describe_failure(Path(args.model).name, checks, "nothing is written by eval"))
    print("gate passed: " + ", ".join(f"{c['gate']} {c['measured']:.4g} (limit {c['limit']:.4g})" for c in checks))
    return 0


def cmd_task_export(args) -> int:
    from compactor.task.api import export_task

    if args.format != "onnx":
        raise CompactorError(f"task models export to onnx (got --format {args.format})")
    rec = export_task(args.model, args.out, args.int8, args.calib_data or TASK_TRAIN,
                      TASK_TEST if args.eval_data is None else args.eval_data, overwrite=args.force)
    for c in rec["verify"]:
        print(f"verified {c['file']} in onnxruntime on {c['examples']} examples: agreement with torch "
              f"{c['agreement']:.4f}, max logit diff {c['max_logit_diff']:.2e}, accuracy {c['accuracy']:.4f}, "
              f"macro-F1 {c['macro_f1']:.4f}, {c['size_bytes'] / 1e6:.1f} MB")
    print(f"fused: {', '.join(f'{k} {v}' for k, v in rec['fused_ops'].items())}")
    set_result(args, out_dir=str(args.out), export=rec)
    print(f"wrote {args.out}")
    return 0


def add_task_parsers(sub) -> None:
    """Add ``finetune`` to the subcommands."""
    f = sub.add_parser("finetune", help="fine-tune an encoder with a classification head (a task teacher)")
    f.add_argument("model", help="encoder: the bundled minilm-l6 or a transformers encoder directory")
    f.add_argument("--task", choices=["classify"], default="classify")
    f.add_argument("--train-data", dest="data", help=f"labeled training data (default {TASK_TRAIN}; or "
                   ".csv/.jsonl/.parquet with text and label columns)")
    f.add_argument("--eval-data", help=f"labeled data scored after every epoch (default {TASK_DEV})")
    f.add_argument("--train-window", dest="window", type=int, help="max tokens per text (default 128)")
    f.add_argument("--epochs", type=float, help="passes over the training data (default 2)")
    f.add_argument("--batch", type=int, help="texts per optimizer step (default 32)")
    f.add_argument("--lr", type=float, help="encoder learning rate (default 5e-5)")
    f.add_argument("--head-lr", type=float, help="head learning rate (default 1e-3)")
    f.add_argument("--seed", type=int)
    f.add_argument("--checkpoint-every", type=int)
    f.add_argument("--out", required=True)
    f.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    f.add_argument("--force", action="store_true")
    f.set_defaults(fn=cmd_finetune)
