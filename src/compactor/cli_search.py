"""The ``search`` subcommand: the best file under a size budget, or the smallest that meets a
quality floor (:mod:`compactor.search`), written with its recipe."""

from __future__ import annotations

import json
from pathlib import Path

from compactor.cli_output import set_result


def cmd_search(args) -> int:
    import shutil

    from compactor.data.windows import domain_windows, windows_for
    from compactor.errors import CompactorError
    from compactor.evaluate.backends import CachedBackend, TorchBackend
    from compactor.export.api import tokenizer_gguf_for
    from compactor.export.gguf import header_bytes
    from compactor.models.load import load_model
    from compactor.recipe import Recipe, run_recipe
    from compactor.recipe.runner import write_applied
    from compactor.search import EMBED_TYPES, GRIDS, Pruning, Target, front_table, rank_subset, search, to_json

    target = Target(args.max_size, args.max_bpw, args.max_kld, args.max_ppl_ratio, args.min_decode_speedup)
    if target.min_decode_speedup is not None and target.min_decode_speedup <= 0:
        raise CompactorError(f"--min-decode-speedup must be positive, got {target.min_decode_speedup}")
    if args.rank_tokens < 0:  # refused before anything is loaded or written
        raise CompactorError(f"--rank-tokens must be 0 or positive, got {args.rank_tokens}")
    loaded = load_model(args.model)
    by_domain = domain_windows(loaded.tokenizer, args.eval_data, args.eval_window, args.eval_stride, args.bos,
                               args.eval_tokens)
    win = next(iter(by_domain.values())) if len(by_domain) == 1 else by_domain
    calib = windows_for(loaded.tokenizer, args.calib_data, args.calib_window,
                        max_tokens=args.samples * args.calib_window)
    grids = tuple(args.grids.split(",")) if args.grids else GRIDS
    embeds = tuple(args.embed_types.split(",")) if args.embed_types else EMBED_TYPES
    # The search's state lives beside the output until the choice is written: the reference's
    # logits (computed once) and every candidate's measurement, which --resume reuses.
    state = Path(str(Path(args.out).resolve()) + ".search")
    if state.exists() and not args.resume:
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    if args.resume:
        print(f"resuming from {state}")
    ref = CachedBackend(TorchBackend(loaded.model, "reference"), half=True, directory=state / "reference")
    header = header_bytes(loaded.model, loaded.tokenizer, tokenizer_gguf_for(loaded), loaded.adapter)
    # Cuts heal on the calibration text, in its window length.
    pruning = (Pruning(max_drop=args.max_drop, heal_tokens=args.heal_tokens, heal_window=args.calib_window)
               if args.allow_pruning else None)
    probe = None
    if args.speed or target.min_decode_speedup is not None:
        from compactor.search_speed import SpeedProbe

        probe = SpeedProbe(loaded, state / "speed", threads=args.threads)
    rank = rank_subset(win, args.rank_tokens) if args.rank_tokens else None
    settings = {k: getattr(args, k) for k in ("model", "calib_data", "samples", "calib_window", "eval_data",
                                              "eval_tokens", "eval_window", "eval_stride", "bos", "rank_tokens")}
    if probe is not None:
        settings["speed"] = probe.settings()
    result = search(loaded, target, calib, win, ref, grids=grids, embeds=embeds,
                    methods=tuple(args.methods.split(",")), mixed=not args.no_mixed, top=args.top,
                    progress=not args.quiet, pruning=pruning, model_spec=args.model, calib_spec=args.calib_data,
                    eval_spec=args.eval_data, work_dir=state / "candidates", header=header,
                    cache_file=state / "measured.json", settings=settings, speed=probe, rank_windows=rank)
    table = front_table(result)
    chosen = result["chosen"]
    print(table)
    print(f"\nchosen: {chosen.label} ({chosen.size_bytes / 1e6:.2f} MB predicted, KLD {chosen.kld:.4f}, "
          f"PPL ratio {chosen.ppl_ratio:.3f}); writing it with its recipe")
    data = {"model": args.model,
            "eval": {"data": args.eval_data, "tokens": args.eval_tokens, "window": args.eval_window, "speed": False},
            "calibration": {"data": args.calib_data, "samples": args.samples, "window": args.calib_window},
            "stages": [{"name": chosen.label, "steps": chosen.steps}]}
    recipe = Recipe.from_dict(data, where="compactor search")
    if result["context"] is not None:  # built in this process: written as it is, not built again
        ctx = write_applied(result["context"], recipe, args.out, overwrite=args.force, progress=not args.quiet)
    else:  # measured before a resume: the recipe builds it again
        ctx = run_recipe(recipe, out=args.out, overwrite=args.force)
    (Path(ctx.out_dir) / "search.json").write_text(to_json(result))
    (Path(ctx.out_dir) / "search.md").write_text("# compactor search\n\n" + table + "\n")
    shutil.rmtree(state, ignore_errors=True)  # the answer is written: its scratch state goes
    set_result(args, out_dir=str(ctx.out_dir), search=json.loads(to_json(result)),
               results=[r.to_dict() for r in ctx.results])
    print(f"wrote {ctx.out_dir} (the chosen model, recipe.yaml for `compactor run`, search.json, search.md, "
          "report.html)")
    return 0


def add_search_parser(sub) -> None:
    """Add ``search`` to the subcommands."""
    from compactor.cli import _add_data_args

    se = sub.add_parser("search", help="the best file under a size budget, or the smallest that meets a quality floor")
    se.add_argument("model")
    se.add_argument("--max-size", type=float, default=None, metavar="MB", help="size budget in MB (deployed GGUF size)")
    se.add_argument("--max-bpw", type=float, default=None, help="size budget in bits per weight")
    se.add_argument("--max-kld", type=float, default=None, help="quality floor: mean KLD against the original")
    se.add_argument("--max-ppl-ratio", type=float, default=None, help="quality floor: PPL / the original's PPL")
    se.add_argument("--min-decode-speedup", type=float, default=None, metavar="X",
                    help="with either kind: llama.cpp decode tok/s at least X times the original's at F16 "
                         "(every built candidate is timed; implies --speed)")
    se.add_argument("--speed", action="store_true",
                    help="time every built candidate in llama.cpp (prefill and decode tok/s, in the front table)")
    se.add_argument("--threads", type=int, default=2, help="llama.cpp threads for --speed (default 2)")
    se.add_argument("--grids", default=None,
                    help="GGUF grids for the decoder linears, comma-separated (default q2_k..q8_0 with iq4_nl)")
    se.add_argument("--methods", default="rtn,gptq",
                    help="methods per grid, cheapest first; the first ranks configurations for the others "
                         "(default rtn,gptq; add awq+gptq to try it too, ~4x GPTQ's time)")
    se.add_argument("--embed-types", default=None,
                    help="embedding (tied head) types to try, comma-separated (default q4_0,q5_0,q8_0)")
    se.add_argument("--top", type=int, default=1,
                    help="configurations (grid + embedding type) the calibrated methods are built on, "
                         "best by the first method first (default 1)")
    se.add_argument("--rank-tokens", type=int, default=1024, metavar="N",
                    help="the first method ranks on the first N scored tokens of each evaluation domain; "
                         "anything that can be chosen is measured on the whole evaluation (default 1024; "
                         "0: rank on the whole evaluation)")
    se.add_argument("--resume", action="store_true",
                    help="reuse the measurements of an interrupted search with the same --out")
    se.add_argument("--no-mixed", action="store_true", help="leave the mixed-precision planner out of a budget search")
    se.add_argument("--allow-pruning", action="store_true",
                    help="also try depth cuts (least-influence layers dropped, healed by distillation, then GPTQ)")
    se.add_argument("--max-drop", type=float, default=0.25, help="with --allow-pruning: at most this share of the layers")
    se.add_argument("--heal-tokens", type=int, default=65536,
                    help="with --allow-pruning: distillation tokens that heal each cut (on the calibration text)")
    se.add_argument("--calib-data", default="calib:mix", help="calibration text (default calib:mix)")
    se.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    se.add_argument("--calib-window", type=int, default=512, help="calibration window length (default 512)")
    _add_data_args(se)
    se.add_argument("--out", required=True, help="where the chosen model is written with its recipe")
    se.add_argument("--force", action="store_true", help="replace an existing output directory")
    se.set_defaults(fn=cmd_search)
