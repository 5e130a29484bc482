"""Pruning quality and speed on the real model.

    python bench/prune_quality.py [--calib-samples 64] [--eval-tokens 8192] [--rows ...] [--no-speed]

Unstructured and N:M rows (magnitude / Wanda / SparseGPT at 50 %, 2:4, 4:8) zero weights in
the decoder linears; with dense kernels that gives **no** speed-up, so only quality is shown.
Structured rows (25 % of layers; 25 % of MLP channels; one of three KV head groups) make a
smaller dense model; their speed is measured side by side with the original in the same run:
in torch (prefill 512 tokens, decode 128) and in llama.cpp (both exported as F16 GGUF).
Quality: PPL, mean KLD and top-1 against the float reference on the Austen evaluation split.
Calibration: Austen calib split. Rows are appended to bench/results/prune.json as they finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, write_result

from compactor.api import quantize_
from compactor.calibration.sequential import calibration_dtype, run_sequential
from compactor.data.windows import windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, LlamaCppBackend, TorchBackend
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.models.load import load_model
from compactor.prune.cuts import choose_layers, lowest_removed
from compactor.prune.importance import unit_importance
from compactor.prune.magnitude import MagnitudeConfig
from compactor.prune.sparsegpt import SparseGPTConfig, apply_sparsegpt
from compactor.prune.stats import overall, sparsity_report
from compactor.prune.structured import count_params, drop_layers, prune_kv_groups, prune_mlp_channels
from compactor.prune.wanda import WandaConfig, apply_wanda

UNSTRUCTURED = {f"{m} {p}": (m, p) for m in ("magnitude", "wanda", "sparsegpt")
                for p in ("unstructured", "2:4", "4:8")}
# llm-compressor's schedule, to explain the gap to its rows: every linear of a layer is
# calibrated in one pass over that layer's input (not true-sequential inside the layer); the
# pruned layer's output feeds the next layer (its propagate_error default). "fp32": also its
# float32 calibration forward instead of our bf16 autocast.
ONE_PASS = {f"{m} unstructured (one pass per layer{d})": (m, "unstructured", dt)
            for m in ("wanda", "sparsegpt") for d, dt in (("", None), (", fp32", "float32"))}
STRUCTURED = ("layers 25% (block influence)", "layers 25% (angular)", "channels 25%", "kv heads 1/3")
JSON = RESULTS / "prune.json"


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def unstructured(model, method, pattern, calib, dtype, true_sequential=True):
    if method == "magnitude":
        quantize_(model, MagnitudeConfig(sparsity=0.5, pattern=pattern))  # the data-free walker
        return
    cfg, handler = ((WandaConfig(sparsity=0.5, pattern=pattern), apply_wanda) if method == "wanda"
                    else (SparseGPTConfig(sparsity=0.5, pattern=pattern), apply_sparsegpt))
    run_sequential(model, calib, handler, cfg, dtype=dtype, progress=False, true_sequential=true_sequential)


def structured(model, row, calib):
    if row.startswith("layers"):
        n = int(round(0.25 * model.config.num_hidden_layers))
        metric = "angular" if "angular" in row else "block_influence"
        drop_layers(model, choose_layers(model, calib, n, metric, progress=False))
        return
    imp = unit_importance(model, calib, progress=False)
    if row.startswith("channels"):
        width = model.config.intermediate_size
        keep = int(round(width * 0.75 / 64)) * 64
        prune_mlp_channels(model, lowest_removed(imp.channels, width - keep))
    else:
        prune_kv_groups(model, lowest_removed(imp.kv_groups, 1))


def speeds(model, tok_gguf, work: Path, name: str) -> dict:
    out = {f"torch_{k}": v for k, v in TorchBackend(model).speed().items()}
    path = work / f"{name}.gguf"
    export_gguf(model, path, types=GGUFTypes("f16", "f16"), tokenizer_gguf=tok_gguf, progress=False)
    be = LlamaCppBackend(path, n_ctx=1024)
    out.update({f"llamacpp_{k}": v for k, v in be.speed().items()})
    be.close()
    path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--rows", nargs="*", default=list(UNSTRUCTURED) + list(STRUCTURED))
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    ref = load_model("smollm2-135m")
    win = windows_for(ref.tokenizer, "austen:eval", 512, max_tokens=args.eval_tokens)
    calib = windows_for(ref.tokenizer, "austen:calib", 512, max_tokens=args.calib_samples * 512)
    cached = CachedBackend(TorchBackend(ref.model, "reference"), half=True)
    dtype = calibration_dtype("auto")
    rows = json.loads(JSON.read_text()) if args.resume and JSON.exists() else []
    done = {r["row"] for r in rows}
    work = Path(tempfile.mkdtemp())
    if not args.no_speed and "original" not in done:
        rows.append({"row": "original", "params": count_params(ref.model),
                     **speeds(ref.model, ref.gguf, work, "original")})
        _write(rows, win, calib)
    for rec in rows:  # speed of structured cuts measured earlier with --no-speed
        if rec["row"] in STRUCTURED and not args.no_speed and "torch_prefill_tok_s" not in rec:
            model = copy.deepcopy(ref.model)
            structured(model, rec["row"], calib)
            rec.update(speeds(model, ref.gguf, work, "pruned"))
            _write(rows, win, calib)
            del model
    for row in args.rows:
        if row in done:
            continue
        model = copy.deepcopy(ref.model)
        reset_peak_rss()
        t0 = time.perf_counter()
        if row in UNSTRUCTURED:
            unstructured(model, *UNSTRUCTURED[row], calib, dtype)
        elif row in ONE_PASS:
            m, pat, dt = ONE_PASS[row]
            unstructured(model, m, pat, calib, calibration_dtype(dt) if dt else dtype, true_sequential=False)
        else:
            structured(model, row, calib)
        wall = time.perf_counter() - t0
        rss = peak_rss_bytes()
        r = evaluate(model, win, reference=cached, speed=False, name=row, progress=False)
        rec = dict(row=row, params=count_params(model), seconds=wall, peak_rss_gb=rss / 1e9, ppl=r.ppl,
                   ref_ppl=r.ref_ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1,
                   sparsity=overall(sparsity_report(model, _linears(model))))
        if row in STRUCTURED and not args.no_speed:
            rec.update(speeds(model, ref.gguf, work, "pruned"))
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        _write(rows, win, calib)
        del model
    _write(rows, win, calib)  # also re-renders rows added by bench/prune_llmcompressor.py


def _pct(x) -> str:
    return "not recorded" if x is None else f"{x:.1%}"


def _schedule_finding(rows) -> str:
    """What llm-compressor's rows pruned (from each row's recorded ignore list and the sparsity
    its head / embedding ended with), and how much of the gap to ours each explanation closes:
    the head pruned with the decoder linears, and the one-pass calibration schedule."""
    llmc = [r for r in rows if r["row"].startswith("llm-compressor")]
    if not llmc:
        return ""
    orig = next((r["original_embedding_zeros"] for r in llmc if "original_embedding_zeros" in r), None)
    table = ["| llm-compressor row | ignore list | head sparsity | embedding sparsity | head tied | KLD mean |",
             "|---|---|---|---|---|---|"]
    for r in llmc:
        table.append(f"| {r['row']} | {r.get('ignore', 'not recorded')} | {_pct(r.get('head_sparsity'))} | "
                     f"{_pct(r.get('embedding_sparsity'))} | {r.get('head_tied', 'not recorded')} | "
                     f"{r['kld_mean']:.4f} |")
    by = {r["row"]: r for r in rows}
    out = []
    for m in ("wanda", "sparsegpt"):
        ours = by.get(f"{m} unstructured")
        mine = [r for r in llmc if f" {m} unstructured" in r["row"]]
        # kept: the head has no zeros beyond the original's own; pruned: clearly more
        base = orig or 0.0
        kept = next((r for r in mine if r.get("head_sparsity") is not None
                     and r["head_sparsity"] <= base + 1e-3), None)
        pruned = next((r for r in mine if (r.get("head_sparsity") or 0) > base + 0.05), None)
        if not (ours and (kept or pruned)):
            continue
        parts = [f"ours (true-sequential inside each layer) {ours['kld_mean']:.4f}"]
        parts += [f"{by[k]['row']} {by[k]['kld_mean']:.4f}" for k in ONE_PASS if k in by and k.startswith(m)]
        for tag, r in (("head kept", kept), ("head pruned", pruned)):
            if r is not None:
                parts.append(f"llm-compressor, {tag} {r['kld_mean']:.4f} ({r['kld_mean'] / ours['kld_mean']:.2f}× ours)")
        if kept and pruned and pruned["kld_mean"] > ours["kld_mean"]:
            share = (pruned["kld_mean"] - kept["kld_mean"]) / (pruned["kld_mean"] - ours["kld_mean"])
            parts.append(f"pruning the head made {100 * share:.0f} % of the first rows' gap")
        out.append(f"- {m}: " + "; ".join(parts) + ".")
    return ("\n\n### What llm-compressor pruned, and the gap to ours\n\n"
            "Both compute the same score (Wanda: |W| · ‖x‖ per input column, pruned per output row; "
            "SparseGPT: the OBS update) and feed each layer the previous pruned layer's output. Read in "
            "its code (0.14.0.1, sgpt_base.py): a target module that is itself a Linear is named "
            "`f\"{layer_name}.{name}\"` with an empty name, so the head is matched as `lm_head.` and an "
            "ignore list of `lm_head` does not hold — its warning advises `re:.*lm_head`. The head and "
            "embedding sparsity below are measured on each row's pruned model. A second difference: "
            "llm-compressor calibrates all of a layer's linears in one pass over its input, ours is "
            "true-sequential inside the layer; the one-pass rows run our code on that schedule "
            "(', fp32': also its float32 forward)."
            + ("" if orig is None else f" The original's embedding (the tied head) already has {_pct(orig)} exact "
               "zeros (it is dequantized from the bundled GGUF).")
            + "\n\n" + "\n".join(table) + "\n\n" + "\n".join(out))


def _write(rows, win, calib) -> None:
    JSON.write_text(json.dumps(rows, indent=1))
    orig = next((r for r in rows if r["row"] == "original"), {})

    def ratio(r, k):
        return f"{r[k] / orig[k]:.2f}×" if k in r and k in orig else ""

    q, s = [], []
    for r in rows:
        if r["row"] == "original":
            continue
        line = (f"| {r['row']} | {r['params'] / 1e6:.1f} | {r['sparsity']:.1%} | {r['ppl']:.2f} | "
                f"{r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['top1']:.1f} | {r['seconds']:.0f} |")
        q.append(line)
        if "torch_prefill_tok_s" in r:
            s.append(f"| {r['row']} | {ratio(r, 'torch_prefill_tok_s')} | {ratio(r, 'torch_decode_tok_s')} | "
                     f"{ratio(r, 'llamacpp_prefill_tok_s')} | {ratio(r, 'llamacpp_decode_tok_s')} |")
    ref_ppl = next((r["ref_ppl"] for r in rows if "ref_ppl" in r), float("nan"))
    finding = _schedule_finding(rows)
    orig_speed = (f"Original: torch prefill {orig['torch_prefill_tok_s']:.0f} tok/s, decode "
                  f"{orig['torch_decode_tok_s']:.1f} tok/s; llama.cpp (F16) prefill {orig['llamacpp_prefill_tok_s']:.0f} "
                  f"tok/s, decode {orig['llamacpp_decode_tok_s']:.1f} tok/s.\n\n") if orig else ""
    body = (
        f"Evaluation: Austen eval split (Persuasion), {len(win)} × 512 tokens, no BOS; reference PPL "
        f"{ref_ppl:.3f}. Calibration: Austen calib split, {len(calib)} × 512 tokens. Unstructured/N:M "
        "rows prune the decoder linears (embedding and tied head untouched); sparsity is measured over them. "
        "With dense kernels these zeros give no CPU speed-up; only structured cuts make the model faster. "
        "Rows named llm-compressor come from bench/prune_llmcompressor.py (its own venv: it pins "
        "transformers <= 5.17) on the same reference, calibration and evaluation windows, scored by the "
        "same harness. Wall times are single runs on a shared 2-core VM: compare them loosely.\n\n"
        "| method | params (M) | sparsity | PPL | KLD mean | KLD p99 | top-1 % | seconds |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(q) + finding +
        "\n\n## Speed of the structured cuts (ratio to the original, same run, 2 threads)\n\n" + orig_speed +
        "Medians of 3; on this shared VM repeated measurements of one model differ by up to ~30 %, so ratios "
        "within that band of 1 are noise.\n\n" +
        "| cut | torch prefill | torch decode | llama.cpp prefill | llama.cpp decode |\n|---|---|---|---|---|\n"
        + "\n".join(s) + "\n")
    write_result("prune", "Pruning quality (SmolLM2-135M)", body)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
