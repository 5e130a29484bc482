"""Models bigger than memory: streamed vs in-memory on SmolLM2, and a synthetic >7B Llama.

    python bench/scale.py [--parts smol synthetic torchrun] [--resume] [--table-only]

Every measurement is a fresh ``compactor`` process run under ``/usr/bin/time -v``, so its
peak RSS is the kernel's count for the whole process tree (torchrun workers included):

* ``smol``: SmolLM2-135M GPTQ Q4_0 on 128 x 512 calibration tokens (calib:mix), in memory
  and streamed, interleaved run by run (``--repeats``), outputs compared byte for byte.
* ``synthetic``: a Llama-3-8B-shaped checkpoint (hidden 4096, MLP 14336, 32 heads / 8 KV
  heads, SmolLM2's 49,152-token vocabulary, untied head; 7.4 B parameters, 29.5 GB in float32)
  with random weights written as bf16 safetensors shards — and an 8-layer cut of it for the
  depth check. RTN Q4_0 -> GGUF (verified in llama.cpp) streamed under ``--max-memory``, and
  GPTQ Q4_0 on a few calibration windows. Quality on random weights means nothing: these rows
  measure memory, time and disk.
* ``torchrun``: SmolLM2 GPTQ on 1 and 2 processes, outputs compared.
* ``vocab``: a Gemma-3-270M-shaped checkpoint (262,144-token vocabulary, random bf16
  weights): RTN Q4_0 and its evaluation against the original on 16 x 512 tokens, in memory
  and streamed — peak RSS of evaluating a 262k vocabulary. ``--baseline-src DIR`` adds the
  same runs with the code of another checkout (e.g. one from before chunked evaluation).

Records go to ``bench/results/scale.json`` after every run (``--resume`` skips those
already there); ``bench/results/scale.md`` renders from that file only.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, prov_ref, provenance, provenance_lines, write_result

JSON = RESULTS / "scale.json"
WORK = Path(os.environ.get("COMPACTOR_SCALE_DIR", Path.home() / ".cache" / "compactor" / "scale"))
SYNTH = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 49152, "tie_word_embeddings": False}


def compactor(*args: str) -> list[str]:
    return [sys.executable, "-m", "compactor.cli", *args]


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS (KiB -> bytes), exit code."""
    load = os.getloadavg()[0]  # > ~0.5 before a run: another job shared the cores
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    plan = re.search(r"estimated peak RSS\s+([\d.]+ [GM]B)", proc.stderr)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    verify = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("verification")]
    # A failed run is a result too: recorded with its exit code and message, not dropped.
    return {"seconds": round(wall, 1), "peak_rss_bytes": int(m.group(1)) * 1024 if m else None,
            "planned_peak": plan.group(1) if plan else None, "command": " ".join(cmd[2:]),
            "load_before": round(load, 2), "exit_code": proc.returncode,
            "verification": verify[-1][:400] if verify else None,
            "error": err[-1][:400] if err else (None if proc.returncode == 0 else proc.stderr[-400:])}


def same_outputs(a: Path, b: Path) -> dict:
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors" or p.suffix == ".gguf"
                   or p.name in ("quantization.json", "model.safetensors.index.json"))
    diff = [n for n in names if not (b / n).exists() or not filecmp.cmp(a / n, b / n, shallow=False)]
    return {"files_compared": len(names), "files_differing": diff}


def codes_differing(a: Path, b: Path) -> dict:
    """How many integer codes differ between two quantized outputs, and in how many modules."""
    from compactor.quant.storage import _read_module_tensors, read_manifest

    ma, mb = read_manifest(a), read_manifest(b)
    diff = total = mods = 0
    for n, e in ma.items():
        ta = _read_module_tensors(a, e, n, [f"{n}.codes"])[f"{n}.codes"]
        tb = _read_module_tensors(b, mb[n], n, [f"{n}.codes"])[f"{n}.codes"]
        d = int((ta != tb).sum())
        diff, total, mods = diff + d, total + ta.numel(), mods + (d > 0)
    return {"codes_differing": diff, "codes": total, "modules_differing": mods, "modules": len(ma)}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


#: Gemma-3-270M's text shape (262k vocabulary, tied head)
GEMMA3_270M = {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
               "vocab_size": 262144, "sliding_window": 512, "query_pre_attn_scalar": 256,
               "rope_theta": 1000000.0, "tie_word_embeddings": True}


def make_synthetic(dest: Path, layers: int, family: str = "llama") -> None:
    """Random weights (normal, std 0.02; norms 1) in bf16 shards, SmolLM2's tokenizer:
    ``llama`` in :data:`SYNTH`'s shape, or ``gemma3`` in :data:`GEMMA3_270M`'s."""
    import torch
    from transformers import Gemma3TextConfig, LlamaConfig

    from compactor.models.load import load_model
    from compactor.models.stream import skeleton_from_config
    from compactor.quant.storage import ModelWriter

    if (dest / "config.json").exists():
        return
    tok = load_model("smollm2-135m", stream=True).tokenizer
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gemma3":
        cfg = Gemma3TextConfig(**{**GEMMA3_270M, "num_hidden_layers": layers}, max_position_embeddings=4096,
                               **ids)
        cfg.architectures = ["Gemma3ForCausalLM"]
    else:
        cfg = LlamaConfig(**SYNTH, num_hidden_layers=layers, max_position_embeddings=4096, rope_theta=500000.0,
                          **ids)
        cfg.architectures = ["LlamaForCausalLM"]
    skel = skeleton_from_config(cfg)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ModelWriter(tmp)
    g = torch.Generator().manual_seed(0)
    for name, p in skel.named_parameters():
        t = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=g) * 0.02
        writer.weights.add(name, t.to(torch.bfloat16))
    writer.close(cfg, tok)
    tmp.rename(dest)


def record(records: list[dict], key: str, **fields) -> None:
    records[:] = [r for r in records if r["key"] != key] + [{"key": key, **fields, "prov": provenance()}]
    JSON.write_text(json.dumps(records, indent=1))
    _write(records)


def part_smol(records, args) -> None:
    common = ["--method", "gptq", "--grid", "q4_0", "--samples", "128", "--no-eval", "--force"]
    flags = {"memory": [], "streamed": ["--stream"], "spilled": ["--stream", "--spill-activations"]}
    for rep in range(args.repeats):
        for mode, extra in flags.items():
            key = f"smol {mode} {rep}"
            if args.resume and any(r["key"] == key for r in records):
                continue
            out = WORK / f"smol-{mode}"
            r = timed(compactor("quantize", "smollm2-135m", *common, "--out", str(out), *extra))
            record(records, key, part="smol", mode=mode, repeat=rep, command_flags=extra, **r)
    record(records, "smol identity", part="smol", mode="identity",
           **same_outputs(WORK / "smol-memory", WORK / "smol-streamed"))
    if (WORK / "smol-spilled").exists():
        record(records, "smol identity spilled", part="smol", mode="identity",
               **same_outputs(WORK / "smol-memory", WORK / "smol-spilled"))


def part_synthetic(records, args) -> None:
    for layers in args.synthetic_depths:
        src = WORK / f"synthetic-llama-{layers}l"
        if not (src / "config.json").exists():
            t0 = time.perf_counter()
            make_synthetic(src, layers)
            record(records, f"synthetic make {layers}", part="synthetic", step="make", layers=layers,
                   seconds=round(time.perf_counter() - t0, 1), disk_bytes=du(src))
        key = f"synthetic rtn {layers}"
        want_gguf = layers == 32 and "gguf" in args.steps and not (
            args.resume and any(r["key"] == f"synthetic gguf {layers}" for r in records))
        rtn_out = WORK / f"synthetic-{layers}l-rtn"
        if "rtn" in args.steps and (not (args.resume and any(r["key"] == key for r in records))
                                    or (want_gguf and not (rtn_out / "config.json").exists())):
            out = WORK / f"synthetic-{layers}l-rtn"
            r = timed(compactor("quantize", str(src), "--method", "rtn", "--grid", "q4_0", "--stream",
                                "--no-eval", "--max-memory", args.max_memory, "--force", "--out", str(out)))
            record(records, key, part="synthetic", step="rtn", layers=layers, disk_bytes=du(out), **r)
        key = f"synthetic gguf {layers}"
        if want_gguf:
            gg = WORK / f"synthetic-{layers}l-q4_0.gguf"
            # Random weights give near-flat logits: llama.cpp's 8-bit activation rounding flips
            # the top-1 of near-tied tokens (0.805 on this model), so the top-1 floor is off here
            # while the exact code check and the KLD bound stay; real models keep MIN_TOP1.
            r = timed(compactor("export", str(WORK / f"synthetic-{layers}l-rtn"), "--format", "gguf",
                                "--stream", "--max-memory", args.max_memory, "--verify-min-top1", "0",
                                "--force", "--out", str(gg)))
            # A failed export (its verification refused the file) leaves no file: recorded with
            # its exit code and error line, not a crash of the bench.
            record(records, key, part="synthetic", step="gguf", layers=layers,
                   disk_bytes=gg.stat().st_size if gg.exists() else None, verify_min_top1=0.0,
                   verify_note="top-1 floor off for random weights (near-flat logits); codes exact, KLD <= 0.02",
                   **r)
        key = f"synthetic gptq {layers}"
        if "gptq" in args.steps and layers in args.gptq_depths and not (args.resume and any(r["key"] == key for r in records)):
            out = WORK / f"synthetic-{layers}l-gptq"
            r = timed(compactor("quantize", str(src), "--method", "gptq", "--grid", "q4_0", "--stream",
                                "--samples", str(args.gptq_windows), "--no-eval", "--max-memory",
                                args.max_memory, "--force", "--out", str(out)))
            record(records, key, part="synthetic", step="gptq", layers=layers,
                   windows=args.gptq_windows, disk_bytes=du(out), **r)


def part_torchrun(records, args) -> None:
    """1 process x 2 threads, 2 processes x 1 thread, and 1 process x 1 thread: the last is
    the like-for-like check (float32 products depend on the thread count, and GPTQ carries
    the last bit forward), the first the wall-time baseline."""
    common = ["--method", "gptq", "--grid", "q4_0", "--samples", "128", "--no-eval", "--force"]
    for n, threads, tag in ((1, 2, "1"), (2, 1, "2"), (1, 1, "1t")):
        key = f"torchrun {tag}"
        if args.resume and any(r["key"] == key for r in records):
            continue
        out = WORK / f"torchrun-{tag}"
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m",
                "compactor.cli"] if n > 1 else compactor())
        r = timed([*cmd, "quantize", "smollm2-135m", *common, "--out", str(out)],
                  env={"OMP_NUM_THREADS": str(threads)})
        record(records, key, part="torchrun", processes=n, threads=threads, **r)
    for a, b, key in (("1", "2", "torchrun identity"), ("1t", "2", "torchrun identity 1t")):
        if (WORK / f"torchrun-{a}").exists() and (WORK / f"torchrun-{b}").exists():
            record(records, key, part="torchrun", processes=0, against=f"{a} vs {b}",
                   **same_outputs(WORK / f"torchrun-{a}", WORK / f"torchrun-{b}"),
                   **codes_differing(WORK / f"torchrun-{a}", WORK / f"torchrun-{b}"))


def part_teacher(records, args) -> None:
    """Distillation from a teacher bigger than memory: the synthetic 32-layer model (29.5 GB
    in float32) streamed into SmolLM2's top-k cache, a few steps — peak RSS and time."""
    src = WORK / "synthetic-llama-32l"
    key = "teacher distill 32"
    if args.resume and any(r["key"] == key for r in records):
        return
    out = WORK / "teacher-distill"
    r = timed(compactor("distill", "--teacher", str(src), "--teacher-stream", "--student", "smollm2-135m",
                        "--train-data", "calib:mix", "--train-tokens", str(args.teacher_tokens),
                        "--train-window", "128", "--eval-window", "128", "--calib-window", "128",
                        "--batch", "4", "--micro-batch", "2", "--top-k", "32", "--eval-data", "austen:eval",
                        "--eval-tokens", "512", "--no-speed", "--force", "--out", str(out)))
    rep = {}
    if (out / "provenance.json").exists():
        rep = next((x for x in json.loads((out / "provenance.json").read_text())["reports"]
                    if x["step"] == "distill"), {})
    record(records, key, part="teacher", layers=32, tokens=args.teacher_tokens, window=128,
           train_seconds=rep.get("train_seconds"), **r)


def part_vocab(records, args) -> None:
    src = WORK / "synthetic-gemma3-270m"
    if not (src / "config.json").exists():
        t0 = time.perf_counter()
        make_synthetic(src, GEMMA3_270M["num_hidden_layers"], "gemma3")
        record(records, "vocab make", part="vocab", step="make", seconds=round(time.perf_counter() - t0, 1),
               disk_bytes=du(src))
    codes = {"current": None}
    if args.baseline_src:
        codes["baseline"] = Path(args.baseline_src).resolve()
    for code, path in codes.items():
        for mode in ("memory", "streamed"):
            key = f"vocab {code} {mode}"
            if args.resume and any(r["key"] == key for r in records):
                continue
            out = WORK / f"gemma3-{code}-{mode}"
            env = {"PYTHONPATH": str(path / "src")} if path else None
            commit = (subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() if path else None)
            r = timed(compactor("quantize", str(src), "--method", "rtn", "--grid", "q4_0", "--eval-data",
                                "austen:eval", "--eval-tokens", str(args.vocab_tokens), "--no-speed", "--force", "--out", str(out),
                                *(["--stream"] if mode == "streamed" else [])), env=env)
            res = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else []
            ev = next((e for e in reversed(res) if e.get("kld_mean") is not None), {})
            record(records, key, part="vocab", step=mode, code=code, code_commit=commit, tokens=args.vocab_tokens,
                   kld_mean=ev.get("kld_mean"), **r)
            shutil.rmtree(out / "reference-logits", ignore_errors=True)


#: Llama-3.1-70B's shape, for the projection on paper
LLAMA70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
            "num_key_value_heads": 8, "num_hidden_layers": 80}


def gptq_layer_cost(shape: dict, tokens: int) -> dict:
    """Multiply-add counts of one GPTQ layer (the model the projection scales by):
    per linear (out x in) the column updates and lazy batch updates (2 out in^2) and the
    damped Cholesky + triangular inverse of its own Hessian (2/3 in^3); and the layer's
    forwards over the calibration tokens (observe, then propagate: 2 x 2 params x tokens)."""
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linears = [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)]  # (out, in): q k v o gate up down
    solve = sum(2 * o * i * i + 2 / 3 * i ** 3 for o, i in linears)
    params = sum(o * i for o, i in linears)
    return {"solve": solve, "forward": 4 * params * tokens, "params": params}


def _projection(records: list[dict]) -> str:
    """On paper, from the measured GPTQ seconds per layer at the 8B width."""
    r = next((x for x in records if x.get("key") == "synthetic gptq 8" and not x.get("exit_code")), None)
    if r is None:
        return ""
    tokens = r["windows"] * 512
    per_layer = r["seconds"] / r["layers"]
    c8, c70 = gptq_layer_cost({**SYNTH, "num_hidden_layers": 32}, tokens), gptq_layer_cost(LLAMA70B, tokens)
    ratio = (c70["solve"] + c70["forward"]) / (c8["solve"] + c8["forward"])
    rows = []
    for name, layers, t_layer, cost in (("8B (32 layers)", 32, per_layer, c8),
                                        ("70B (80 layers)", 80, per_layer * ratio, c70)):
        share = cost["forward"] / (cost["solve"] + cost["forward"])
        total = layers * t_layer
        # Under torchrun the forwards split across processes; every process solves every module.
        on = " / ".join(f"{total * ((1 - share) + share / n) / 3600:.1f} h" for n in (2, 4, 8))
        rows.append(f"| {name} | {t_layer:.0f} | {total / 3600:.1f} h | {share:.0%} | {on} |")
    return ("## On paper: GPTQ of an 8B and a 70B model on this machine, and on N machines\n\n"
            f"From the measured {per_layer:.0f} s per layer of the 8-layer 8B-width GPTQ run above "
            f"({r['windows']} calibration windows of 512, load {r.get('load_before')} before it; run "
            f"{prov_ref(records, r)}), scaled by a count of multiply-adds per layer (`gptq_layer_cost`: "
            "column and lazy updates 2·out·in² and the inverse ⅔·in³ per linear, forwards 4·params·tokens): "
            f"a 70B layer (Llama-3.1-70B shape) costs {ratio:.1f}× an 8B one. Peak memory is flat in depth "
            "(measured above), so it is the 8B run's at 8B; at 70B the largest Hessian "
            f"({LLAMA70B['intermediate_size']:,}² float64 accumulator, {LLAMA70B['intermediate_size'] ** 2 * 8 / 1e9:.1f} GB, "
            "plus float32 solver copies) alone passes an 8 GB cap. Under torchrun "
            "the calibration forwards split across N machines, and the modules of a group that share an "
            "input (q/k/v, gate/up) are solved by different owners; o and down are solved by one process. "
            "The table divides only the forward share (conservative).\n\n"
            "| model | s / layer | 1 machine | forward share | 2 / 4 / 8 machines |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _gb(b) -> str:
    return "" if b is None else f"{b / 1e9:.2f}"


def _write(records: list[dict]) -> None:
    import statistics

    by = {r["key"]: r for r in records}
    out = []
    smol = {m: [r for r in records if r.get("part") == "smol" and r.get("mode") == m]
            for m in ("memory", "streamed", "spilled")}
    smol = {m: v for m, v in smol.items() if v}
    if "memory" in smol and len(smol) > 1:
        med = {m: (statistics.median(r["seconds"] for r in v), statistics.median(r["peak_rss_bytes"] for r in v))
               for m, v in smol.items()}
        lines = []
        for m in smol:
            if m == "memory":
                continue
            ident = by.get("smol identity" + (" spilled" if m == "spilled" else ""), {})
            lines.append(f"{m} / in memory: wall {med[m][0] / med['memory'][0]:.2f}x, peak RSS "
                         f"{med[m][1] / med['memory'][1]:.2f}x. Outputs: {ident.get('files_compared', '?')} files "
                         f"compared, differing: {ident.get('files_differing', '?') or 'none'}.")
        out.append("## SmolLM2-135M, GPTQ Q4_0, 128 x 512 calibration tokens (calib:mix)\n\n"
                   "'spilled': streamed with `--spill-activations` (the activations between layers and the "
                   "replayed consumers' inputs in files, one batch in memory).\n\n"
                   "| run | repeats | wall s (median) | peak RSS GB (median) | planned peak | load before | runs |\n"
                   "|---|---|---|---|---|---|---|\n"
                   + "\n".join(f"| {m} | {len(v)} | {med[m][0]:.0f} ({', '.join(str(r['seconds']) for r in v)}) | "
                               f"{_gb(med[m][1])} | {v[0]['planned_peak']} | "
                               f"{', '.join(str(r.get('load_before', '')) for r in v)} | "
                               f"{' '.join(sorted({prov_ref(records, r) for r in v}))} |"
                               for m, v in smol.items())
                   + "\n\n" + "\n".join(lines) + "\n")
    syn = [r for r in records if r.get("part") == "synthetic"]
    if syn:
        rows = []
        for r in syn:
            per_layer = r["seconds"] / r["layers"] if r.get("step") != "make" else None
            status = "" if not r.get("exit_code") else f" (FAILED: {r['error']})"
            rows.append(f"| {r['step']}{status} | {r['layers']} | {r.get('windows', '')} | {r['seconds']:.0f} | "
                        f"{'' if per_layer is None else f'{per_layer:.1f}'} | {_gb(r.get('peak_rss_bytes'))} | "
                        f"{r.get('planned_peak') or ''} | {_gb(r.get('disk_bytes'))} | {r.get('load_before', '')} | "
                        f"{prov_ref(records, r)} |")
        out.append("## Synthetic Llama-3-8B shape (random bf16 weights), streamed\n\n"
                   f"Shape: {json.dumps(SYNTH)}; 32 layers = 7.38 B parameters (29.5 GB in float32, "
                   "14.8 GB in bf16); the 8-layer cut checks that peak RSS is flat in depth.\n\n"
                   "| step | layers | calib windows | wall s | s / layer | peak RSS GB | planned peak | disk GB | load before | run |\n"
                   "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
                   + "".join(f"\n{r['step']} {r['layers']} layers, llama.cpp check: {r['verification']}"
                             + (f" ({r['verify_note']})" if r.get("verify_note") else "") + "\n"
                             for r in syn if r.get("verification")))
    tr = [r for r in records if r.get("part") == "torchrun" and r.get("processes")]
    if tr:
        idents = []
        for key in ("torchrun identity", "torchrun identity 1t"):
            ident = by.get(key)
            if ident is None:
                continue
            pair = ident.get("against", "1 vs 2")
            idents.append(f"- {pair} ({prov_ref(records, ident)}): {ident.get('files_compared', '?')} files compared, "
                          f"differing: {ident.get('files_differing') or 'none'}"
                          + (f"; {ident['codes_differing']:,} of {ident['codes']:,} codes differ "
                             f"({ident['codes_differing'] / ident['codes']:.2%}) in {ident['modules_differing']} of "
                             f"{ident['modules']} modules" if "codes" in ident else "") + ".")
        out.append("## torchrun, SmolLM2 GPTQ Q4_0 (128 x 512), gloo on this 2-core machine\n\n"
                   "| run | processes | threads each | wall s | peak RSS GB (largest process of the tree) | load before | run |\n"
                   "|---|---|---|---|---|---|---|\n"
                   + "\n".join(f"| {r['key'].split()[-1]} | {r['processes']} | {r.get('threads', max(1, 2 // r['processes']))} | "
                               f"{r['seconds']:.0f} | {_gb(r['peak_rss_bytes'])} | {r.get('load_before', '')} | "
                               f"{prov_ref(records, r)} |" for r in tr)
                   + "\n\nOutputs compared (runs named as in the first column):\n" + "\n".join(idents) + "\n")
    out.append(_projection(records))
    te = [r for r in records if r.get("part") == "teacher"]
    if te:
        out.append("## Distillation from a streamed teacher bigger than memory\n\n"
                   "Teacher: the synthetic 32-layer Llama-3-8B-shaped checkpoint above (29.5 GB in float32), "
                   "`--teacher-stream`: read layer by layer into the student's top-k cache and the evaluation's "
                   "logit cache. Student: SmolLM2-135M, in memory.\n\n"
                   "| teacher layers | training tokens | wall s | of which training s | peak RSS GB | load before | run |\n"
                   "|---|---|---|---|---|---|---|\n"
                   + "\n".join(f"| {r['layers']} | {r['tokens']} | {r['seconds']:.0f}"
                               f"{'' if not r.get('exit_code') else ' FAILED: ' + str(r['error'])} | "
                               f"{r.get('train_seconds') or ''} | {_gb(r.get('peak_rss_bytes'))} | "
                               f"{r.get('load_before', '')} | {prov_ref(records, r)} |" for r in te) + "\n")
    voc = [r for r in records if r.get("part") == "vocab" and r.get("step") != "make"]
    if voc:
        v, n = GEMMA3_270M["vocab_size"], voc[0]["tokens"] // 512
        out.append("## A 262k vocabulary: Gemma-3-270M shape (random bf16 weights), RTN Q4_0 + evaluation\n\n"
                   f"Evaluation: {voc[0]['tokens']:,} tokens of austen:eval in {n} windows of 512 against the "
                   f"original (its logits cached on disk in float16, {n * 512 * v * 2 / 1e9:.1f} GB). For scale: "
                   f"one window's float32 logits are {512 * v * 4 / 1e6:.0f} MB, and {n} windows held in float16 "
                   f"would be {n * 512 * v * 2 / 1e9:.1f} GB.\n\n"
                   "| code | model | wall s | peak RSS GB | planned peak | KLD | load before | run |\n|---|---|---|---|---|---|---|---|\n"
                   + "\n".join(f"| {r['code']}{' (' + r['code_commit'] + ')' if r.get('code_commit') else ''}"
                               f"{'' if not r.get('exit_code') else ' FAILED: ' + str(r['error'])} | {r['step']} | "
                               f"{r['seconds']:.0f} | {_gb(r.get('peak_rss_bytes'))} | {r.get('planned_peak') or ''} | "
                               f"{'' if r.get('kld_mean') is None else format(r['kld_mean'], '.4f')} | "
                               f"{r.get('load_before', '')} | {prov_ref(records, r)} |" for r in voc) + "\n")
    write_result("scale", "Scale: streaming, a synthetic >7B model, torchrun",
                 "Peak RSS: `/usr/bin/time -v`'s maximum resident set size of the whole command "
                 "(process tree). 'load before': the 1-minute load average when the run started "
                 "(above ~0.5, another job shared the 2 cores and wall times are inflated).\n\n"
                 + "\n".join(out) + "\nRuns:\n" + provenance_lines(records))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="*", default=["smol", "synthetic", "torchrun"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-memory", default="8GB")
    ap.add_argument("--gptq-windows", type=int, default=4)
    ap.add_argument("--gptq-depths", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--steps", nargs="*", default=["rtn", "gguf", "gptq"], help="synthetic part: which steps")
    ap.add_argument("--synthetic-depths", type=int, nargs="*", default=[8, 32],
                    help="synthetic part: cuts of the 8B shape to make and run (peak RSS is per layer)")
    ap.add_argument("--vocab-tokens", type=int, default=8192)
    ap.add_argument("--teacher-tokens", type=int, default=1024, help="teacher part: training tokens")
    ap.add_argument("--baseline-src", default=None, help="vocab part: also run another checkout's code")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--redo", nargs="*", default=[], metavar="PART_OR_KEY",
                    help="with --resume: drop these parts' stored rows (or the rows of these keys, "
                    "e.g. 'synthetic gptq 8') and measure them again")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    records = json.loads(JSON.read_text()) if JSON.exists() and (args.resume or args.table_only) else []
    records = [r for r in records if r.get("part") not in args.redo and r["key"] not in args.redo]
    if args.table_only:
        return _write(records)
    provenance()
    WORK.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        {"smol": part_smol, "synthetic": part_synthetic, "torchrun": part_torchrun,
         "vocab": part_vocab, "teacher": part_teacher}[part](records, args)


if __name__ == "__main__":
    main()
