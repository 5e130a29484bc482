"""A tiny QAT recipe run in its own process (for the SIGKILL-resume test).

    python qat_run.py WORKDIR OUT.safetensors [--kill-at STEP] [--resume]
"""

import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    work, out = Path(sys.argv[1]), sys.argv[2]
    kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else None
    torch.set_num_threads(1)
    from compactor.distill.trainer import Distiller
    from compactor.models.tiny import tiny_model, tiny_tokenizer
    from compactor.quant.qlinear import QuantizedLinear
    from compactor.recipe import Recipe, run_recipe

    model_dir = work / "model"
    if not model_dir.exists():
        tiny_model(seed=3).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    text = work / "text.txt"
    text.write_text("\n".join(f"row {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 5}"
                              for i in range(80)))
    if kill_at is not None:
        step = Distiller.train_step

        def killing(self):
            rec = step(self)
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return rec

        Distiller.train_step = killing
    recipe = Recipe.from_dict({
        "model": str(model_dir), "eval": {"data": str(text), "tokens": 256, "window": 64, "speed": False},
        "calibration": {"data": str(text), "samples": 4, "window": 64},
        "stages": [{"name": "s", "steps": [
            {"rtn": {"grid": "q4_0"}},
            {"qat": {"data": str(text), "tokens": 64 * 4 * 8, "window": 64, "batch": 4, "micro_batch": 2,
                     "eval_tokens": 128, "eval_data": str(text), "checkpoint_every": 2, "lr": 3e-3,
                     "precision": "fp32", "freeze_codes": 0.75}}]}]})
    ctx = run_recipe(recipe, out=work / "out", resume="--resume" in sys.argv, progress=False)
    tensors = {}
    for n, m in ctx.model.named_modules():
        if isinstance(m, QuantizedLinear):
            tensors[f"{n}.codes"] = m.codes.contiguous()
            tensors[f"{n}.scale"] = m.qparams.scale.contiguous()
    save_file(tensors, out)


if __name__ == "__main__":
    main()
