"""How fast the evaluation harness scores tokens on the real model, in memory and through
llama.cpp, with and without a reference (the reference costs one more forward per window).

    python bench/eval_harness.py [--tokens 32768]
"""

from __future__ import annotations

import argparse
import time

from _common import write_result

from compactor.data.windows import windows_for
from compactor.evaluate import evaluate, table
from compactor.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    smol = load_model("smollm2-135m")
    win = windows_for(smol.tokenizer, "austen:eval", 512, max_tokens=args.tokens)
    rows, results = [], []
    for label, cand, ref in [
        ("torch, PPL only", smol, None),
        ("torch vs reference (itself)", smol, smol),
        ("llama.cpp (Q4_1 GGUF), PPL only", str(smol.gguf), None),
        ("llama.cpp (Q4_1 GGUF) vs torch reference", str(smol.gguf), smol),
    ]:
        t0 = time.perf_counter()
        r = evaluate(cand, win, reference=ref, speed=ref is None, name=label)
        wall = time.perf_counter() - t0
        results.append(r)
        rows.append(f"| {label} | {win.input_ids.numel()} | {r.eval_seconds:.1f} | "
                    f"{r.eval_tok_s:.0f} | {wall:.1f} |")
    body = (
        f"Evaluation split (Persuasion), {len(win)} windows of 512 tokens, no BOS.\n\n"
        "| what | tokens | scoring s | tokens/s | wall s (incl. speed test) |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nMetrics of the same runs:\n\n"
        + table(results)
    )
    print(body)
    print("wrote", write_result("eval_harness", "Evaluation harness throughput", body))


if __name__ == "__main__":
    main()
