"""Mixed precision on the real model: measured-KL and Hessian-proxy allocations against
uniform grids at the same bits per weight (decoder linears + the tied embedding/head).

    python bench/mixed_precision.py [--budgets 4.5 5.5] [--calib-samples 64]

Each budget is compared with the uniform grid of that size (q4_0 at 4.5, q5_0 at 5.5), by
RTN and by GPTQ, all scored against the float reference on the Austen evaluation split.
The table is rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from _common import RESULTS, write_result
from quant_quality import linear_bpw

from compactor.api import quantize_
from compactor.calibration.sequential import calibration_dtype, run_sequential
from compactor.data.windows import windows_for
from compactor.evaluate import evaluate
from compactor.models.load import load_model
from compactor.quant.gptq import GPTQConfig, apply_gptq
from compactor.quant.mixed import MixedPrecisionConfig, plan_mixed_precision
from compactor.quant.plan import apply_planned
from compactor.quant.qlinear import tie_head
from compactor.quant.rtn import RTNConfig, rtn_embedding

UNIFORM = {4.5: "q4_0", 5.5: "q5_0"}


def uniform(model, adapter, grid, method, calib):
    """Every decoder linear and the embedding on one grid."""
    if method == "rtn":
        quantize_(model, RTNConfig(grid=grid))
    else:
        run_sequential(model, calib, apply_gptq, GPTQConfig(grid=grid), dtype=calibration_dtype("auto"),
                       progress=False)
    emb = model.get_submodule(adapter.embed)
    model.set_submodule(adapter.embed, rtn_embedding(emb.weight, RTNConfig(grid=grid), adapter.embed))
    tie_head(model, adapter.embed, adapter.lm_head)
    return {"mix": {grid: 1.0}}


def mixed(model, adapter, budget, sensitivity, then, calib):
    cfg = MixedPrecisionConfig(target_bpw=budget, sensitivity=sensitivity, then=then,
                               embeddings=sensitivity == "kl")
    if sensitivity == "hessian":  # the embedding is not a choice: give it the uniform grid's size
        emb = model.get_submodule(adapter.embed)
        model.set_submodule(adapter.embed, rtn_embedding(emb.weight, RTNConfig(grid=UNIFORM[budget]),
                                                         adapter.embed))
        tie_head(model, adapter.embed, adapter.lm_head)
    return apply_planned(model, calib, cfg, plan_mixed_precision, adapter=adapter, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="*", type=float, default=[4.5, 5.5])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--table-only", action="store_true", help="re-render the table from the JSON")
    args = ap.parse_args()
    if args.table_only:
        meta = json.loads((RESULTS / "mixed_precision.json").read_text())
        _write(meta["rows"], meta["windows"], meta["calib"], meta["ref_ppl"])
        return
    ref = load_model("smollm2-135m")
    win = windows_for(ref.tokenizer, "austen:eval", 512, max_tokens=args.eval_tokens)
    calib = windows_for(ref.tokenizer, "austen:calib", 512, max_tokens=args.calib_samples * 512)
    runs = []
    for b in args.budgets:
        runs += [(b, "uniform", "rtn"), (b, "hessian", "rtn"), (b, "kl", "rtn")]
        runs += [(b, "uniform", "gptq"), (b, "kl", "gptq")]
    records = []
    for budget, how, method in runs:
        model = copy.deepcopy(ref.model)
        t0 = time.perf_counter()
        if how == "uniform":
            rep = uniform(model, ref.adapter, UNIFORM[budget], method, calib)
        else:
            rep = mixed(model, ref.adapter, budget, how, method, calib)
        wall = time.perf_counter() - t0
        r = evaluate(model, win, reference=ref.model, speed=False, progress=False)
        bpw, mix = linear_bpw(model)  # over every module stored as codes (embedding included)
        records.append(dict(budget=budget, allocation=how, method=method, bpw=bpw, mix=mix,
                            ppl=r.ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1,
                            size_mb=r.size_bytes / 1e6, seconds=wall,
                            embed=model.get_submodule(ref.adapter.embed).label,
                            measured_kl=rep.get("measured_kl")))
        print(_row(records[-1]), flush=True)
        _write(records, len(win), len(calib), r.ref_ppl)


def _row(r: dict) -> str:
    from compactor.primitives.ggml import resolve_type

    embed = resolve_type(r["embed"], 576)[0].name  # a K-quant candidate reported as its fallback
    mix = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["mix"].items(), key=lambda kv: -kv[1]))
    bpw = f"{r['bpw']:.3f}"
    return (f"| {r['budget']} | {r['allocation']} | {r['method']} | {bpw} | {mix} | {embed} | "
            f"{r['size_mb']:.1f} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | {r['kld_p99']:.3f} | "
            f"{100 * r['top1']:.1f}% | {r['seconds']:.0f} |")


def _write(records, n_win, n_calib, ref_ppl):
    body = (
        "Weights counted: the 210 decoder linears and the tied embedding/head (28.3 M of the "
        "134.5 M parameters); norms stay float. `uniform`: every one of them on the budget's "
        "grid (q4_0 = 4.5 bpw, q5_0 = 5.5 bpw). `kl`: grids from {q3_k, q4_0, q4_k, q5_0, "
        "q5_k, q6_k, q8_0} chosen per module (embedding included) from measured KL: each decoder "
        "layer rounded whole to the probe grid (q3_k, falling back to q4_0 on 576-wide rows) on "
        "1024 calibration tokens, split among the layer's modules and across grids by the "
        "Hessian proxy; the embedding measured at every grid. `hessian`: the proxy alone, over "
        "the linears only (the embedding is fixed at the uniform grid so the total matches). "
        "Then RTN, or GPTQ on the planned grids. K-quants apply to down_proj only (576-wide "
        "rows fall back as llama.cpp does: q3_k -> q4_0, q4_k -> q5_0, q5_k -> q5_1, "
        "q6_k -> q8_0). "
        f"Calibration: Austen calib split, {n_calib} x 512 tokens. Evaluation: Austen eval split, "
        f"{n_win} x 512 tokens, against the float reference (PPL {ref_ppl:.3f}). size MB: the "
        "in-memory model's storage (codes + scales + float norms). seconds: planning + quantization.\n\n"
        "| budget bpw | allocation | then | achieved bpw | grid mix (share of weights) | embedding | "
        "size MB | PPL | KLD mean | KLD p99 | top-1 | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(_row(r) for r in records))
    write_result("mixed_precision", "Mixed precision (SmolLM2-135M)", body)
    meta = {"windows": n_win, "calib": n_calib, "ref_ppl": ref_ppl, "rows": records}
    (RESULTS / "mixed_precision.json").write_text(json.dumps(meta, indent=1, default=str))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
