"""llm-compressor's SparseGPT and Wanda modifiers on the same setup as bench/prune_quality.py.

    # llm-compressor 0.14 pins transformers <= 5.17, so it lives in its own venv:
    python3 -m venv ../llmc-venv && ../llmc-venv/bin/pip install torch==2.13.0 llmcompressor gguf accelerate
    ../llmc-venv/bin/pip install --no-deps -e .
    cd bench && ../../llmc-venv/bin/python prune_llmcompressor.py [--rows ...]

Same float reference (the dequantized bundled GGUF), same 64 × 512 Austen calibration windows,
same evaluation windows and metrics (compactor's harness) as bench/prune_quality.py; rows are
appended to bench/results/prune.json under "llm-compressor <method> <pattern>" and show up in
prune.md the next time prune_quality.py --resume renders it.

Ignore list: llm-compressor 0.14.0.1 names a target module that is itself a Linear
``f"{layer_name}.{name}"`` with an empty ``name`` (sgpt_base.py, on_calibration_start), so the
tied head is matched as ``"lm_head."`` and ``ignore=["lm_head"]`` does not match it: the head —
and with it SmolLM2's tied embedding — was pruned to 50 % in the first rows. Its own warning
advises ``re:.*lm_head``, the default here. ``--ignore lm_head`` reproduces the old setup; every
row records its ignore list and the sparsity the head/embedding ended with.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from _common import RESULTS, provenance

from compactor.data.windows import windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, TorchBackend
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.models.load import load_model
from compactor.prune.stats import overall, sparsity_report
from compactor.prune.structured import count_params

JSON = RESULTS / "prune.json"
ROWS = [f"{m} {p}" for m in ("sparsegpt", "wanda") for p in ("unstructured", "2:4", "4:8")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=ROWS)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ignore", nargs="*", default=["re:.*lm_head"],
                    help="llm-compressor's ignore list (lm_head: the first rows' setup, which prunes the head)")
    a = ap.parse_args()
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    ref = load_model("smollm2-135m")
    win = windows_for(ref.tokenizer, "austen:eval", 512, max_tokens=a.eval_tokens)
    calib = windows_for(ref.tokenizer, "austen:calib", 512, max_tokens=a.calib_samples * 512)
    ds = Dataset.from_dict({"input_ids": calib.input_ids.tolist(),
                            "attention_mask": torch.ones_like(calib.input_ids).tolist()})
    cached = CachedBackend(TorchBackend(ref.model, "reference"), half=True)
    # the reference's own exact zeros (its embedding was dequantized from the bundled GGUF)
    orig_zeros = float((ref.model.get_input_embeddings().weight == 0).float().mean())
    rows = json.loads(JSON.read_text()) if JSON.exists() else []
    for row in a.rows:
        name = f"llm-compressor {llmcompressor.__version__} {row}"
        if a.ignore != ap.get_default("ignore"):
            name += f" (ignore={a.ignore})"
        method, pattern = row.split()
        structure = "0:0" if pattern == "unstructured" else pattern
        cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
        modifier = cls(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=list(a.ignore))
        model = copy.deepcopy(ref.model)
        reset_peak_rss()
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=len(calib),
                max_seq_length=calib.length)
        wall = time.perf_counter() - t0
        rss = peak_rss_bytes()
        model.eval()
        head = ref.adapter.lm_head
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != head]
        head_w = model.get_submodule(head).weight
        embed_w = model.get_input_embeddings().weight
        r = evaluate(model, win, reference=cached, speed=False, name=name, progress=False)
        rec = dict(row=name, params=count_params(model), seconds=wall, peak_rss_gb=rss / 1e9, ppl=r.ppl,
                   ref_ppl=r.ref_ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1,
                   sparsity=overall(sparsity_report(model, linears)), ignore=list(a.ignore),
                   head_sparsity=float((head_w == 0).float().mean()),
                   embedding_sparsity=float((embed_w == 0).float().mean()), original_embedding_zeros=orig_zeros,
                   head_tied=head_w.data_ptr() == embed_w.data_ptr(), prov=provenance())
        rows = [x for x in rows if x["row"] != name] + [rec]
        JSON.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rec), flush=True)
        del model


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
