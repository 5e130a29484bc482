"""The ``compactor`` command line: parse, call the library, print. No logic of its own.

Bad input prints one line ``error: ...`` and exits with code 2 (``--debug`` for a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compactor.cli_output import add_output_args, emit, output_streams, set_result, stage_result
from compactor.cli_search import add_search_parser
from compactor.cli_task import add_task_parsers
from compactor.cli_train import add_training_parsers


def _add_data_args(p: argparse.ArgumentParser, default: str = "domains") -> None:
    """The evaluation text and windows: ``--eval-*`` in every subcommand (training text is
    ``--train-*``, calibration text ``--calib-data``/``--samples``/``--calib-window``)."""
    p.add_argument("--eval-data", default=default,
                   help="evaluation text: 'domains' (Austen prose, Python code, technical prose, C "
                        "headers), a split (austen:eval, code:eval, tech:eval, c:eval, chat:eval, "
                        "austen:<novel>), a .txt/.jsonl/.parquet file or directory, or a "
                        f"comma-separated list of these, each scored on its own (default {default})")
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="tokens to evaluate per domain (default 8192)")
    p.add_argument("--eval-window", type=int, default=512, help="evaluation window length in tokens (default 512)")
    p.add_argument("--eval-stride", type=int, default=None,
                   help="evaluation window stride (default: the window, no overlap)")
    p.add_argument("--bos", choices=["auto", "none", "prepend"], default="auto",
                   help="BOS policy of the evaluation windows: auto = as the model's tokenizer does "
                        "(default; Gemma prepends, SmolLM2 does not); none = plain slices; prepend = "
                        "BOS + window-1 tokens")


#: flags of earlier versions -> (subcommands, their name now): one meaning per flag everywhere
_RENAMED = {
    "--data": ({"eval", "quantize", "prune"}, "--eval-data", {"distill", "qat"}, "--train-data"),
    "--text": ({"eval", "quantize", "prune"}, "--eval-data", set(), ""),
    "--tokens": ({"eval", "quantize", "prune"}, "--eval-tokens", {"distill", "qat"}, "--train-tokens"),
    "--window": ({"eval", "quantize", "prune"}, "--eval-window", {"distill", "qat"}, "--train-window"),
    "--stride": ({"eval", "quantize", "prune"}, "--eval-stride", set(), ""),
}


def _renamed_flag(argv: list[str]) -> str | None:
    """The one-line error for a flag that was renamed, or None."""
    sub = next((a for a in argv if not a.startswith("-")), None)
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag in _RENAMED:
            eval_subs, eval_new, train_subs, train_new = _RENAMED[flag]
            if sub in eval_subs:
                return f"{flag} is now {eval_new} (the evaluation text; training text is --train-*, calibration --calib-*)"
            if sub in train_subs:
                return f"{flag} is now {train_new} (the training text; evaluation text is --eval-*)"
    return None


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="store_true",
                   help="keep the model on disk and read it layer by layer (models bigger than memory)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="cap of the memory plan, e.g. 8GB (default: the memory available); a plan "
                        "over it stops before any work with exit code 2")
    p.add_argument("--spill-activations", action="store_true",
                   help="keep calibration activations on disk between layers (one batch in memory)")
    if p.prog.split()[-1] != "run":  # run has its own --resume
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run (a streamed step from its last finished layer)")


def _memory_keys(args) -> dict:
    return {"stream": args.stream, "max_memory": args.max_memory,
            "spill_activations": args.spill_activations}


def cmd_fetch(args) -> int:
    from compactor.data.austen import austen_dir
    from compactor.models.load import resolve_source

    from compactor.models.bundled import BUNDLED_ENCODERS, bundled_encoder_dir

    if args.model in BUNDLED_ENCODERS:  # an encoder, and the labeled tweets it is measured on
        from compactor.data.labeled import tweets_dir

        set_result(args, encoder=str(bundled_encoder_dir(args.model)))
        print(f"{args.model}: encoder {args.result['encoder']}")
        if not args.no_data:
            set_result(args, tweets=str(tweets_dir()))
            print(f"tweets: {args.result['tweets']}")
        return 0
    directory, gguf, _ = resolve_source(args.model)
    set_result(args, gguf=str(gguf), checkpoint=str(directory))
    print(f"{args.model}: GGUF {gguf}\n  float checkpoint {directory}")
    if not args.no_data:
        set_result(args, austen=str(austen_dir()))
        print(f"austen: {args.result['austen']}")
    return 0


def cmd_eval(args) -> int:
    from compactor.cli_task import cmd_task_eval, is_task_target

    if is_task_target(args.model, args.task):
        return cmd_task_eval(args)
    from compactor.data.windows import domain_windows
    from compactor.evaluate import evaluate, table
    from compactor.models.load import load_model

    is_gguf = str(args.model).endswith(".gguf")
    # A GGUF runs in llama.cpp; its tokenizer comes from its transformers conversion.
    loaded = load_model(args.model) if not is_gguf or args.reference is None else None
    ref = load_model(args.reference) if args.reference else None
    tokenizer = (loaded or ref).tokenizer
    by_domain = domain_windows(tokenizer, args.eval_data, args.eval_window, args.eval_stride, args.bos,
                               args.eval_tokens)
    win = next(iter(by_domain.values())) if len(by_domain) == 1 else by_domain
    target = args.model if is_gguf else loaded
    result = evaluate(target, win, reference=ref, speed=not args.no_speed,
                      name=Path(args.model).name)
    print(table([result]))
    set_result(args, results=[result.to_dict()])
    from compactor.recipe.gates import Gate, check_gate, describe_failure

    gate = Gate(**{k: getattr(args, k) for k in _GATE_FLAGS})
    if not gate.empty:
        if gate.needs_reference() and ref is None:
            from compactor.errors import CompactorError

            raise CompactorError("--max-kld, --max-ppl-ratio and --min-top1 need --reference")
        checks = check_gate(gate, result)
        if not all(c["passed"] for c in checks):
            from compactor.errors import GateFailed

            raise GateFailed(describe_failure(Path(args.model).name, checks, "nothing is written by eval"))
        print("gate passed: " + ", ".join(f"{c['gate']} {c['measured']:.4g} (limit {c['limit']:.4g})" for c in checks))
    return 0


_GATE_FLAGS = ("max_kld", "max_ppl_ratio", "min_top1", "max_size_mb", "max_bpw", "min_accuracy_retention")


def cmd_run(args) -> int:
    from compactor.evaluate import table
    from compactor.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    from compactor.recipe.task import TaskRecipe

    if isinstance(recipe, TaskRecipe):
        return _run_task_recipe(args, recipe)
    if args.stream or args.max_memory or args.spill_activations:  # flags override the recipe
        import dataclasses

        keys = {k: v for k, v in _memory_keys(args).items() if v}
        recipe = dataclasses.replace(recipe, **keys)
    out = args.out or f"runs/{Path(args.recipe).stem}"
    ctx = run_recipe(recipe, out=out, overwrite=args.force, resume=args.resume)
    print(table(ctx.results))
    print(f"\nwrote {ctx.out_dir} (model, recipe.yaml, metrics.json, provenance.json)")
    stage_result(args, ctx)
    return 0


def _run_task_recipe(args, recipe) -> int:
    from compactor.errors import CompactorError
    from compactor.recipe.task import run_task_recipe

    if args.stream or args.max_memory or args.spill_activations:
        raise CompactorError("--stream, --max-memory and --spill-activations are for language-model recipes")
    out = args.out or f"runs/{Path(args.recipe).stem}"
    from compactor.errors import GateFailed

    try:
        record = run_task_recipe(recipe, out, overwrite=args.force, resume=args.resume)
    except GateFailed:  # the output was written: its measurements go with the exit code 3
        set_result(args, out_dir=out, **json.loads(Path(out, "metrics.json").read_text()))
        raise
    set_result(args, out_dir=out, **record)
    for row in record["stages"]:
        ret = "" if row["retention"] is None else f", retention {row['retention']:.4f}"
        print(f"{row['stage']}: {row['model']} accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}, "
              f"{row['size_bytes'] / 1e6:.1f} MB{ret}")
    print(f"\nwrote {out} (one directory per step, recipe.yaml, metrics.json)")
    return 0


def _run_one_stage(args, steps: list[dict], where: str):
    """Build and run a one-stage recipe from the shared model/eval/calibration flags."""
    from compactor.recipe import Recipe, run_recipe

    data = {
        "model": args.model,
        "eval": {"data": args.eval_data, "tokens": args.eval_tokens, "window": args.eval_window,
                 "after_each_stage": not args.no_eval, "speed": not args.no_speed},
        "calibration": {"data": args.calib_data, "samples": args.samples, "window": args.calib_window},
        **_memory_keys(args),
        "stages": [{"name": args.method, "steps": steps}],
    }
    return run_recipe(Recipe.from_dict(data, where=where), out=args.out, overwrite=args.force,
                      resume=args.resume)


def cmd_quantize(args) -> int:
    from compactor.evaluate import table
    from compactor.recipe.presets import WEIGHT_METHODS, weight_steps

    args.grid_default = args.grid is None
    args.grid = args.grid or "q4_0"

    from compactor.errors import CompactorError
    from compactor.primitives.ggml import GGML_TYPES

    if args.grid in GGML_TYPES and (args.group_size is not None or args.bits is not None or args.asym):
        raise CompactorError(f"--group-size, --bits and --asym describe int/nf4 grids; {args.grid}'s "
                             "block geometry is fixed by the GGUF format")
    if args.method in WEIGHT_METHODS and args.grid_default:
        print(f"grid: {args.grid} (the default; --grid int --group-size 64 for an int grid)")
    grid = {"grid": args.grid, "bits": args.bits or 4, "group_size": args.group_size or 128,
            "symmetric": not args.asym}
    gptq = {"act_order": args.act_order, "dampening": args.dampening, "diag_mix": args.diag_mix}
    mixed = {"target_bpw": args.target_bpw, "sensitivity": args.sensitivity, "then": args.then,
             "embeddings": args.sensitivity == "kl" and not args.no_embeddings}
    if args.candidates:
        mixed["candidates"] = args.candidates.split(",")
    int8 = {"grid": "int", "bits": 8, "group_size": -1}
    if args.method in WEIGHT_METHODS:
        steps = weight_steps(args.method, grid, gptq, args.clip)
    elif args.method == "mixed":
        steps = [{"mixed_precision": mixed}]
    else:  # w8a8
        steps = ([{"smoothquant": {"alpha": args.smooth}}] if args.smooth > 0 else []) \
            + [{"rtn": int8}, {"activations": {"mode": args.act}}]
    ctx = _run_one_stage(args, steps, "compactor quantize")
    for rep in ctx.reports:
        for note in rep.get("notes", []):
            print(f"note: {note}")
    if ctx.results:
        print(table(ctx.results))
    if not ctx.loaded.streamed:
        from compactor.evaluate.size import deployed_size

        # The size column is the deployment's (the GGUF file's tensors, embedding Q8_0, for
        # GGUF grids); memory holds the float32 embedding besides.
        nbytes, memory = deployed_size(ctx.loaded.model)
        if memory is not None:
            print(f"size: {nbytes / 1e6:.1f} MB as GGUF tensors (export defaults, embedding q8_0); "
                  f"{memory / 1e6:.1f} MB in memory (float32 embedding)")
            set_result(args, gguf_tensor_bytes=nbytes, memory_bytes=memory)
    print(f"\nwrote {ctx.out_dir} (codes in quantization-*.safetensors, recipe.yaml, metrics.json, provenance.json)")
    stage_result(args, ctx)
    return 0


def cmd_export(args) -> int:
    from compactor.cli_task import cmd_task_export, is_task_target
    from compactor.errors import CompactorError

    if args.verify_min_top1 is not None and args.format != "gguf":
        raise CompactorError("--verify-min-top1 is the GGUF verification's top-1 floor; "
                             f"a {args.format} export has its own fixed check")
    if args.matmul_accuracy is not None and args.format != "onnx":
        raise CompactorError(f"--matmul-accuracy is how an ONNX graph's MatMulNBits compute; a {args.format} "
                             "export has no such node")
    if args.max_memory is not None and args.format != "gguf":
        raise CompactorError(f"--max-memory caps a GGUF export's plan; a {args.format} export holds the "
                             "model in memory (it has no plan of its own yet)")
    if is_task_target(args.model, None):
        if args.matmul_accuracy is not None:
            raise CompactorError("--matmul-accuracy is for a causal LM's MatMulNBits graph; an encoder's "
                                 "ONNX int8 is --int8 dynamic|static")
        return cmd_task_export(args)
    if args.int8 == "static":
        raise CompactorError("--int8 static is for task models (encoders); a causal LM's ONNX int8 is "
                             "dynamic (per-channel weights, activations per batch)")
    if args.calib_data or args.eval_data:
        raise CompactorError("--calib-data and --eval-data of export are for task models (encoders)")
    from compactor.export.api import export_model
    from compactor.export.gguf import GGUFTypes
    from compactor.models.load import load_model

    loaded = load_model(args.model, stream=args.stream)
    opts = {}
    if args.format == "gguf":
        opts["types"] = GGUFTypes(args.type, args.embed_type, args.head_type)
        opts["min_top1"] = args.verify_min_top1
        opts["max_memory"] = args.max_memory
    elif args.format == "onnx":
        opts["int8"] = args.int8 is not None
        opts["embed_type"] = args.embed_type
        opts["matmul_accuracy"] = args.matmul_accuracy or "fp32"
    else:
        opts["float_type"] = args.float_type
    res = export_model(loaded, args.format, args.out, overwrite=args.force,
                       verify=not args.no_verify, **opts)
    s = res.summary
    if "type_mix" in s:
        mix = ", ".join(f"{k} {v * 100:.1f}%" for k, v in s["type_mix"].items())
        print(f"types by share of parameters: {mix}")
    for note in res.notes:
        print(f"note: {note}")
    if res.verification:
        from compactor.export.verify import Verification

        v = res.verification
        print(Verification(**v).describe() if args.format == "gguf" else
              f"verification passed in {v['runtime']}: KLD vs memory {v['kld_mean']:.2e} on {v['tokens']} tokens, "
              f"top-1 {v['top1']:.3f}")
    size = s.get("size_bytes")
    set_result(args, path=str(res.path), summary=s, verification=res.verification, notes=list(res.notes))
    print(f"wrote {res.path}" + (f" ({size / 1e6:.1f} MB, {s['bpw']:.2f} bits per weight)"
                                 if size and "bpw" in s else ""))
    return 0


def cmd_prune(args) -> int:
    from compactor.evaluate import table

    unstructured = {"sparsity": args.sparsity, "pattern": args.pattern}
    step = {
        "magnitude": {"magnitude": {**unstructured, "scope": args.scope}},
        "wanda": {"wanda": unstructured},
        "sparsegpt": {"sparsegpt": unstructured},
        "heads": {"prune_heads": {"fraction": args.fraction, "importance": args.head_importance}},
        "channels": {"prune_channels": {"fraction": args.fraction}},
        "layers": {"drop_layers": {"fraction": args.fraction, "metric": args.metric}},
    }[args.method]
    ctx = _run_one_stage(args, [step], "compactor prune")
    for rep in ctx.reports:
        if "sparsity" in rep:
            s = rep["sparsity"]
            print(f"sparsity: {s['measured_sparsity']:.2%} over {s['layers']} matrices "
                  f"(target {s['target_sparsity']:.2%}; per layer {s['min_layer']:.2%}..{s['max_layer']:.2%})")
        if "params_after" in rep:
            print(f"parameters: {rep['params_before']:,} -> {rep['params_after']:,}")
    if ctx.results:
        print(table(ctx.results))
    print(f"\nwrote {ctx.out_dir}")
    stage_result(args, ctx)
    return 0


def cmd_stats(args) -> int:
    from compactor.models.load import load_model
    from compactor.prune.stats import format_report, sparsity_report

    loaded = load_model(args.model)
    report = sparsity_report(loaded.model)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(format_report(report))
    print(f"parameters: {params:,}; quantized linears: {loaded.info.get('quantized_modules', 0)}")
    set_result(args, sparsity=[{"name": r.name, "shape": list(r.shape), "zeros": r.zeros, "numel": r.numel}
                               for r in report], params=params, quantized_modules=loaded.info.get("quantized_modules", 0))
    return 0


def cmd_report(args) -> int:
    from compactor.report import write_report

    path = write_report(args.run_dir, args.out)
    set_result(args, path=str(path))
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compactor", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="download, verify and convert a bundled model (+ the Austen text; for the "
                       "encoder minilm-l6, the labeled tweets)")
    f.add_argument("model", nargs="?", default="smollm2-135m")
    f.add_argument("--no-data", action="store_true", help="skip fetching the Austen corpus (or the tweets)")
    f.set_defaults(fn=cmd_fetch)

    e = sub.add_parser("eval", help="perplexity, KLD/top-1 vs a reference, size and speed")
    e.add_argument("model", help="alias, transformers directory, or .gguf file (run in llama.cpp)")
    e.add_argument("--reference", help="reference model for KL divergence and top-1 agreement")
    e.add_argument("--task", choices=["classify"], default=None,
                   help="classify: accuracy, macro-F1, confusion and latency of a task model (found "
                        "automatically for a task directory or its .onnx; --eval-data default tweets:test)")
    _add_data_args(e)
    e.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed test")
    for flag, what in (("max-kld", "mean KLD"), ("max-ppl-ratio", "PPL / reference PPL"),
                       ("max-size-mb", "size in MB"), ("max-bpw", "bits per weight")):
        e.add_argument(f"--{flag}", type=float, help=f"gate: fail (exit 3) if the {what} is above this")
    e.add_argument("--min-top1", type=float, help="gate: fail (exit 3) if top-1 agreement is below this")
    e.add_argument("--min-accuracy-retention", type=float,
                   help="gate, task models: fail (exit 3) if accuracy / the --reference's accuracy is below this")
    e.set_defaults(fn=cmd_eval)

    q = sub.add_parser("quantize", help="quantize weights (RTN, GPTQ, AWQ, mixed precision) on an int, "
                       "NF4 or GGUF grid, or weights + activations (W8A8)")
    q.add_argument("model")
    q.add_argument("--method", choices=["rtn", "gptq", "awq", "awq+gptq", "mixed", "w8a8"], default="gptq",
                   help="quantization method (default gptq)")
    q.add_argument("--grid", default=None, help="int, nf4, or a GGUF type: q8_0 q5_0 q5_1 q4_0 q4_1 "
                   "iq4_nl q6_k q5_k q4_k q3_k q2_k (default q4_0: its 32-wide blocks divide every "
                   "common row width)")
    q.add_argument("--bits", type=int, default=None, help="int grid bits, 2..8 (default 4)")
    q.add_argument("--group-size", type=int, default=None,
                   help="int/nf4 group size; -1 per channel, 0 per tensor (default 128)")
    q.add_argument("--asym", action="store_true", help="asymmetric int grid (zero point)")
    q.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ without activation order (default: act-order with static groups)")
    q.add_argument("--dampening", type=float, default=0.01, help="GPTQ damping fraction (default 0.01)")
    q.add_argument("--diag-mix", type=float, default=0.1,
                   help="GPTQ: solve with (1-λ)H + λ·diag(H); 0.1 (default) transfers best across "
                        "domains (bench/results/gptq_domains.md), 0 is classic GPTQ")
    q.add_argument("--clip", action="store_true", help="AWQ: also search per-group clipping ranges")
    q.add_argument("--target-bpw", type=float, default=4.5,
                   help="mixed: average bits per weight over the linears (+ embedding) (default 4.5)")
    q.add_argument("--candidates", default=None,
                   help="mixed: comma-separated GGUF grids (default q3_k,q4_0,q4_k,q5_0,q5_k,q6_k,q8_0)")
    q.add_argument("--sensitivity", choices=["kl", "hessian"], default="kl",
                   help="mixed: measured KL per layer (default) or the Hessian proxy alone")
    q.add_argument("--no-embeddings", action="store_true",
                   help="mixed: leave the embedding/head out of the allocation")
    q.add_argument("--then", choices=["rtn", "gptq"], default="rtn", help="mixed: quantizer on the planned grids")
    q.add_argument("--act", choices=["dynamic", "static"], default="dynamic",
                   help="w8a8: per-token dynamic or calibrated static activation scales")
    q.add_argument("--smooth", type=float, default=0.5, help="w8a8: SmoothQuant alpha, 0 = off (default 0.5)")
    q.add_argument("--calib-data", default="calib:mix",
                   help="calibration text: calib:mix (prose, chat, code and technical text balanced "
                        "by tokens; default), a split such as austen:calib, or a file/directory")
    q.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--calib-window", type=int, default=512, help="calibration window length (default 512)")
    _add_data_args(q)
    q.add_argument("--no-eval", action="store_true", help="skip the evaluation against the original")
    q.add_argument("--no-speed", action="store_true", help="skip the speed test")
    _add_memory_args(q)
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    q.set_defaults(fn=cmd_quantize)

    x = sub.add_parser("export", help="write a runtime artifact (GGUF ...) and verify it in its runtime")
    x.add_argument("model", help="a compactor output directory, transformers directory, alias or GGUF")
    x.add_argument("--format", choices=["gguf", "compressed-tensors", "onnx"], default="gguf")
    x.add_argument("--type", default="f16", help="GGUF type for linears that are still float "
                   "(quantized ones keep their codes): f32 f16 bf16 q8_0 ... q2_k (default f16)")
    x.add_argument("--embed-type", default="q8_0",
                   help="type of the token embedding (and a tied head): any GGUF type for gguf; q8_0 or f32 "
                        "for onnx (default q8_0)")
    x.add_argument("--head-type", default=None, help="GGUF type of an untied output head (default: embed type)")
    x.add_argument("--float-type", default="bf16", choices=["bf16", "f16", "f32"],
                   help="compressed-tensors: dtype of the tensors outside the quantized linears "
                        "(embedding, norms; default bf16)")
    x.add_argument("--int8", nargs="?", const="dynamic", choices=["dynamic", "static"], default=None,
                   help="onnx: also write onnxruntime int8 (verified file: model.int8.onnx): dynamic "
                        "(default when given alone) or, for task models, static (calibrated on --calib-data)")
    x.add_argument("--matmul-accuracy", choices=["fp32", "int8"], default=None,
                   help="onnx: how the MatMulNBits nodes on our codes compute — fp32 (default: equal to the "
                        "model in memory to rounding) or int8 (activations quantized per block inside "
                        "onnxruntime's kernel, as llama.cpp does; much faster, checked to the GGUF bound)")
    x.add_argument("--calib-data", default=None,
                   help="task models, --int8 static: labeled data whose texts calibrate activation ranges "
                        "(default tweets:train)")
    x.add_argument("--eval-data", default=None,
                   help="task models: labeled data the export is verified on in onnxruntime (default tweets:test)")
    x.add_argument("--no-verify", action="store_true",
                   help="skip the runtime check (reload in llama.cpp and compare logits)")
    x.add_argument("--verify-min-top1", type=float, default=None, metavar="F",
                   help="gguf: the verification's top-1 agreement floor (default 0.90). Only for "
                        "random-weight test models, whose near-flat logits make top-1 a coin toss; "
                        "codes are still compared exactly and KLD is still bounded")
    x.add_argument("--out", required=True, help="output file (gguf) or directory (compressed-tensors, onnx)")
    x.add_argument("--force", action="store_true", help="replace an existing output")
    x.add_argument("--stream", action="store_true", help="read the model layer by layer from disk")
    x.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="gguf: cap on the export's memory plan, e.g. 8GB (default: the memory available "
                        "now); over it, nothing is written (exit 2)")
    x.set_defaults(fn=cmd_export)

    pr = sub.add_parser("prune", help="prune: magnitude, Wanda, SparseGPT (N:M too), or structured cuts")
    pr.add_argument("model")
    pr.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt", "heads", "channels", "layers"],
                    default="wanda")
    pr.add_argument("--sparsity", type=float, default=0.5, help="share of weights removed (default 0.5)")
    pr.add_argument("--pattern", default="unstructured", help="unstructured or N:M (N zeros in every M), e.g. 2:4")
    pr.add_argument("--scope", choices=["layer", "row", "global"], default="layer", help="magnitude: threshold scope")
    pr.add_argument("--fraction", type=float, default=0.25,
                    help="structured: share of KV heads / MLP channels / layers removed (default 0.25)")
    pr.add_argument("--head-importance", choices=["activation", "gradient"], default="activation",
                    help="heads: rank by output energy (default) or by Michel et al.'s head-mask gradient")
    pr.add_argument("--metric", choices=["block_influence", "angular"], default="block_influence",
                    help="layers: how to choose them")
    pr.add_argument("--calib-data", default="calib:mix", help="calibration text (default calib:mix)")
    pr.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    pr.add_argument("--calib-window", type=int, default=512)
    _add_data_args(pr)
    pr.add_argument("--no-eval", action="store_true")
    pr.add_argument("--no-speed", action="store_true")
    _add_memory_args(pr)
    pr.add_argument("--out", required=True)
    pr.add_argument("--force", action="store_true")
    pr.set_defaults(fn=cmd_prune)

    st = sub.add_parser("stats", help="sparsity per layer and overall, parameter count")
    st.add_argument("model")
    st.set_defaults(fn=cmd_stats)

    add_training_parsers(sub)
    add_task_parsers(sub)

    add_search_parser(sub)

    rp = sub.add_parser("report", help="write report.html (tables, plots, provenance) for a run's output directory")
    rp.add_argument("run_dir", help="the output directory of a run (holds metrics.json and provenance.json)")
    rp.add_argument("--out", default=None, help="where to write the page (default RUN_DIR/report.html)")
    rp.set_defaults(fn=cmd_report)

    r = sub.add_parser("run", help="run a recipe (YAML) and write its output directory")
    r.add_argument("recipe")
    r.add_argument("--out", help="output directory (default runs/<recipe name>)")
    r.add_argument("--force", action="store_true", help="replace an existing output directory")
    r.add_argument("--resume", action="store_true", help="continue long steps (distill) from their checkpoints")
    _add_memory_args(r)
    r.set_defaults(fn=cmd_run)
    for parser in sub.choices.values():
        add_output_args(parser)
    return p


def main(argv: list[str] | None = None) -> int:
    renamed = _renamed_flag(sys.argv[1:] if argv is None else list(argv))
    if renamed:
        print(f"error: {renamed}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    from compactor.distributed import shutdown

    try:
        return _run(args)
    finally:
        shutdown()  # under torchrun: before the interpreter exits (see compactor.distributed)


def _run(args) -> int:
    from compactor.errors import CompactorError

    try:
        with output_streams(args):
            rc = args.fn(args)
    except CompactorError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        rc = getattr(exc, "exit_code", 2)  # 3: a quality gate failed
        out = getattr(args, "out", None)
        if rc == 3 and getattr(args, "result", None) is None and out and Path(out, "metrics.json").is_file():
            # A failed gate leaves the output of the last stage that passed: its figures go too.
            set_result(args, out_dir=str(out), results=json.loads(Path(out, "metrics.json").read_text()))
        emit(args, rc, error=str(exc))
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    emit(args, rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
