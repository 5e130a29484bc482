"""The training subcommands of the command line: ``distill`` and ``qat``."""

from __future__ import annotations

import argparse

from compactor.cli_output import stage_result

_DISTILL_KEYS = ("student", "ce", "kl", "reverse_kl", "gjsd", "beta", "tv", "hidden_mse", "hidden_cos",
                 "attention", "temperature", "signal", "top_k", "sequence_kd", "on_policy", "prompt_len",
                 "data", "tokens", "window", "batch", "micro_batch", "lr", "precision",
                 "gradient_checkpointing", "lora_rank", "seed", "eval_every", "checkpoint_every")


def cmd_distill(args) -> int:
    if args.task == "classify":
        from compactor.cli_task import cmd_task_distill

        return cmd_task_distill(args)
    if args.trim_vocab or args.epochs is not None:
        from compactor.errors import CompactorError

        raise CompactorError("--trim-vocab and --epochs belong to --task classify")
    from compactor.evaluate import table
    from compactor.recipe import Recipe, run_recipe

    step = {k: getattr(args, k) for k in _DISTILL_KEYS if getattr(args, k) is not None}
    # The step's own before/after evaluation (and --eval-every) scores what --eval-* name.
    step.update(eval_data=args.eval_data, eval_tokens=args.eval_tokens)
    model, step["teacher"] = args.teacher, "original"
    if args.teacher_stream:
        # The student is a model of its own (the recipe's model); the teacher stays on disk
        # and gives its signal through the top-k cache.
        model = args.student
        step.update(teacher=args.teacher, student="current", teacher_stream=True, signal="cache")
    data = {"model": model,
            "eval": {"data": args.eval_data, "tokens": args.eval_tokens, "window": args.eval_window,
                     "speed": not args.no_speed},
            "calibration": {"data": args.calib_data, "samples": 32, "window": args.calib_window},
            "stages": [{"name": "distill", "steps": [{"distill": step}]}]}
    ctx = run_recipe(Recipe.from_dict(data, where="compactor distill"), out=args.out,
                     overwrite=args.force, resume=args.resume)
    if ctx.out_dir is None:
        return 0  # a torchrun worker other than rank 0: rank 0 reports and writes
    rep = next(r for r in ctx.reports if r["step"] == "distill")
    before, after = rep["before"], rep["after"]
    print(f"student: {'; '.join(rep['student'])}, {rep['params']:,} params")
    print(f"trained {rep['tokens']:,} tokens in {rep['train_seconds']:.0f} s ({rep['train_tok_s']:.0f} tok/s, "
          f"{rep['precision']}, {rep['processes']} process(es))")
    if before and after:
        print(f"PPL {before['ppl']:.2f} -> {after['ppl']:.2f}, KLD vs teacher {before['kld']:.4f} -> {after['kld']:.4f}")
    if ctx.results:
        print(table(ctx.results))
    print(f"\nwrote {ctx.out_dir} (model, recipe.yaml, metrics.json, provenance.json, training log in provenance)")
    stage_result(args, ctx)
    return 0



_QAT_KEYS = ("learn", "scale_lr", "freeze_codes", "ce", "kl", "data", "tokens", "window", "batch",
             "micro_batch", "lr", "precision", "gradient_checkpointing", "seed", "eval_every",
             "checkpoint_every")


def cmd_qat(args) -> int:
    """PTQ init (GPTQ, RTN or AWQ+GPTQ on the grid), then quantization-aware distillation to
    the float original, then (optionally) the export, all one recipe."""
    from compactor.evaluate import table
    from compactor.recipe import Recipe, run_recipe

    grid = {"grid": args.grid, "bits": args.bits, "group_size": args.group_size}
    init = {"gptq": [{"gptq": grid}], "rtn": [{"rtn": grid}],
            "awq+gptq": [{"awq": {**grid, "then": "none"}}, {"gptq": grid}]}[args.init]
    step = {k: getattr(args, k) for k in _QAT_KEYS if getattr(args, k) is not None}
    step["teacher"] = args.teacher
    if args.no_offsets:
        step["learn_offsets"] = False
    steps = init + [{"qat": step}]
    if args.lora_rank:  # adapters over the trained codes, kept beside them (exported as an adapter GGUF)
        keep = ("data", "tokens", "window", "batch", "micro_batch", "precision", "seed", "checkpoint_every")
        steps.append({"lora": {"teacher": args.teacher, "rank": args.lora_rank, "alpha": 2.0 * args.lora_rank,
                               **{k: step[k] for k in keep if k in step}}})
    if args.export:
        steps.append({"export": {"format": args.export,
                                 "file": "model.gguf" if args.export == "gguf" else "compressed-tensors"}})
    data = {"model": args.model,
            "eval": {"data": args.eval_data, "tokens": args.eval_tokens, "window": args.eval_window,
                     "speed": not args.no_speed},
            "calibration": {"data": args.calib_data, "samples": args.samples, "window": args.calib_window},
            "stages": [{"name": "qat", "steps": steps}]}
    ctx = run_recipe(Recipe.from_dict(data, where="compactor qat"), out=args.out, overwrite=args.force,
                     resume=args.resume)
    if ctx.out_dir is None:
        return 0
    rep = next(r for r in ctx.reports if r["step"] == "qat")
    print(f"trained {rep['tokens']:,} tokens ({rep['learned']}) in {rep['train_seconds']:.0f} s "
          f"({rep['train_tok_s']:.0f} tok/s over optimizer steps, {rep['precision']})")
    if rep["before"] and rep["after"]:
        print(f"KLD vs teacher {rep['before']['kld']:.4f} -> {rep['after']['kld']:.4f} on its held-out windows")
    if ctx.results:
        print(table(ctx.results))
    print(f"\nwrote {ctx.out_dir} (codes in quantization-*.safetensors, recipe.yaml, metrics.json, provenance.json)")
    stage_result(args, ctx)
    return 0


def add_training_parsers(sub) -> None:
    """Add ``distill`` and ``qat`` to the subcommands."""
    d = sub.add_parser("distill", help="train a smaller student from a teacher (KD, JSD, feature losses)")
    d.add_argument("--teacher", required=True, help="teacher model (alias, directory or GGUF)")
    d.add_argument("--task", choices=["lm", "classify"], default="lm",
                   help="lm: a causal LM on text (default); classify: an encoder task model on labeled "
                        "data (--student layers:F[:every|lower|importance]; --kl α, --ce 1-α, --hidden-cos, "
                        "--attention; --train-data tweets:train; --eval-data scored per epoch, default tweets:dev)")
    d.add_argument("--epochs", type=float, help="classify: passes over the training data (default 2)")
    d.add_argument("--trim-vocab", action="store_true",
                   help="classify: keep only the tokens the training texts use (+ single characters)")
    d.add_argument("--student", default="layers:0.5",
                   help="student spec: layers:every-other, layers:0.5[:angular], channels:0.25, heads:0.33, "
                        "config:k=v,..., random, same, a model path, or '+'-chained (default layers:0.5)")
    d.add_argument("--teacher-stream", action="store_true",
                   help="a teacher bigger than memory: read it layer by layer from its safetensors shards "
                        "into the top-k cache; --student is then the student model (alias or directory)")
    d.add_argument("--calib-data", default="calib:mix", help="text for importance-based student cuts")
    d.add_argument("--train-data", dest="data", help="training text (default austen:train)")
    d.add_argument("--train-tokens", dest="tokens", type=int, help="training token budget")
    d.add_argument("--train-window", dest="window", type=int, help="training window length (default 256)")
    d.add_argument("--batch", type=int, help="windows per optimizer step, across processes (default 16)")
    d.add_argument("--micro-batch", type=int, help="windows per forward/backward (default 4)")
    d.add_argument("--lr", type=float)
    for w in ("ce", "kl", "reverse-kl", "gjsd", "tv", "hidden-mse", "hidden-cos", "attention"):
        d.add_argument(f"--{w}", type=float, dest=w.replace("-", "_"), help=f"weight of the {w} loss term")
    d.add_argument("--beta", type=float, help="generalized JSD β (0 = forward KL, 1 = reverse KL)")
    d.add_argument("--temperature", type=float)
    d.add_argument("--signal", choices=["live", "cache"], help="live teacher or cached top-k log-probs")
    d.add_argument("--top-k", type=int)
    d.add_argument("--sequence-kd", action="store_true", default=None, help="train on teacher-generated text")
    d.add_argument("--on-policy", type=float, help="fraction of steps on student samples scored by the teacher")
    d.add_argument("--prompt-len", type=int)
    d.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    d.add_argument("--gradient-checkpointing", action="store_true", default=None)
    d.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank (peft), merged at the end")
    d.add_argument("--seed", type=int)
    d.add_argument("--eval-every", type=int)
    d.add_argument("--checkpoint-every", type=int)
    d.add_argument("--eval-data", default="domains", help="evaluation text, as eval --eval-data (default domains)")
    d.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens per domain (default 4096)")
    d.add_argument("--eval-window", type=int, default=256, help="evaluation window length (default 256)")
    d.add_argument("--calib-window", type=int, default=256,
                   help="window of the calibration text for importance-based cuts (default 256)")
    d.add_argument("--no-speed", action="store_true")
    d.add_argument("--out", required=True)
    d.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    d.add_argument("--force", action="store_true")
    d.set_defaults(fn=cmd_distill)

    t = sub.add_parser("qat", help="quantization-aware distillation in the exact deployed grid (GPTQ "
                       "init, KL to the float original, codes exported unchanged)")
    t.add_argument("model")
    t.add_argument("--grid", default="q4_0", help="GGUF type or int/nf4 (default q4_0)")
    t.add_argument("--bits", type=int, default=4, help="int grid bits (default 4)")
    t.add_argument("--group-size", type=int, default=128, help="int/nf4 group size (default 128)")
    t.add_argument("--init", choices=["gptq", "rtn", "awq+gptq"], default="gptq",
                   help="the PTQ codes training starts from (default gptq)")
    t.add_argument("--teacher", default="original", help="original (default) or a model path/alias")
    t.add_argument("--learn", choices=["weights+scales", "scales", "weights"])
    t.add_argument("--no-offsets", action="store_true", help="keep grid offsets/minima fixed")
    t.add_argument("--scale-lr", type=float, help="learning rate of the scales, a multiple of --lr")
    t.add_argument("--freeze-codes", type=float, help="fraction of steps after which codes are fixed")
    t.add_argument("--ce", type=float, help="weight of the CE term (default 0)")
    t.add_argument("--kl", type=float, help="weight of the KL-to-teacher term (default 1)")
    t.add_argument("--train-data", dest="data", help="training text (default calib:mix)")
    t.add_argument("--train-tokens", dest="tokens", type=int, help="training token budget (default 65536)")
    t.add_argument("--train-window", dest="window", type=int, help="training window length (default 256)")
    t.add_argument("--eval-window", type=int, default=512, help="evaluation window length (default 512)")
    t.add_argument("--calib-window", type=int, default=512, help="calibration window of the PTQ init (default 512)")
    t.add_argument("--batch", type=int)
    t.add_argument("--micro-batch", type=int)
    t.add_argument("--lr", type=float, help="learning rate of the latent weights (default 1e-5)")
    t.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    t.add_argument("--gradient-checkpointing", action="store_true", default=None)
    t.add_argument("--seed", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--calib-data", default="calib:mix", help="calibration text of the PTQ init")
    t.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    t.add_argument("--lora-rank", type=int, help="then train LoRA adapters of this rank over the "
                   "trained codes (kept separate: with --export gguf, an adapter GGUF beside the base)")
    t.add_argument("--export", choices=["gguf", "compressed-tensors"],
                   help="also export (checked before training: the grid must fit the format)")
    t.add_argument("--eval-data", default="domains")
    t.add_argument("--eval-tokens", type=int, default=4096)
    t.add_argument("--no-speed", action="store_true")
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--force", action="store_true")
    t.set_defaults(fn=cmd_qat)
