"""The noise floor of running a GGUF file in llama.cpp, which sets the export verifier's limits.

    python bench/gguf_noise_floor.py [--eval-tokens 8192]

Each row quantizes SmolLM2-135M in memory (RTN; "f32" leaves it float), exports it with
compactor's GGUF writer and compares llama.cpp's logits with the in-memory model's on the
Austen evaluation split. Weights are identical on both sides (the verifier checks that), so
every difference is the runtime's: llama.cpp rounds activations to 8 bits inside quantized dot
products, and sums in another order.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import write_result

from compactor.api import quantize_
from compactor.data.windows import windows_for
from compactor.export.api import export_model
from compactor.export.gguf import GGUFTypes
from compactor.export.verify import MAX_KLD, MIN_TOP1
from compactor.models.load import load_model
from compactor.quant.rtn import RTNConfig

TYPES = ("f32", "f16", "q8_0", "q6_k", "q4_0", "q4_k")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--types", nargs="*", default=list(TYPES))
    args = ap.parse_args()
    rows = []
    for t in args.types:
        loaded = load_model("smollm2-135m")
        windows = windows_for(loaded.tokenizer, "austen:eval", 512, max_tokens=args.eval_tokens)
        if t not in ("f32", "f16"):
            quantize_(loaded.model, RTNConfig(grid=t))
        embed = "f32" if t == "f32" else "f16" if t == "f16" else "q8_0"
        with tempfile.TemporaryDirectory() as d:
            res = export_model(loaded, "gguf", Path(d) / f"{t}.gguf", windows=windows,
                               types=GGUFTypes(body=t, embed=embed))
        v = res.verification
        rows.append(f"| {t} | {embed} | {res.summary['bpw']:.2f} | {v['tensors_checked']} | "
                    f"{v['max_tensor_error']:.1e} | {v['kld_mean']:.5f} | {v['kld_p99']:.4f} | "
                    f"{v['top1'] * 100:.1f} |")
        print(rows[-1], flush=True)
        body = (f"Windows: Austen evaluation split (Persuasion), {v['tokens']} scored tokens, "
                "512-token windows, no BOS. Weights quantized in memory by RTN, exported, read back.\n\n"
                "| body type | embedding | file bpw | code tensors | max tensor error | KLD mean | "
                "KLD p99 | top-1 % |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
                f"\n\nThe verifier rejects a file with mean KLD > {MAX_KLD} or top-1 < "
                f"{MIN_TOP1 * 100:.0f} % (set from this floor with a wide margin; an export bug such "
                "as a wrong q/k permutation gives KLD > 1).\n")
        write_result("gguf_noise_floor", "GGUF runtime noise floor (llama.cpp vs in-memory)", body)


if __name__ == "__main__":
    main()
