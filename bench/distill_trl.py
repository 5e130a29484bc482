"""TRL's GKD trainer on the same setup as bench/distill.py's ``gjsd`` row, side by side.

    python bench/distill_trl.py [--tokens 131072]   (after bench/distill.py; needs `pip install trl`)

Same student (the layers bench/distill.py dropped, read from bench/results/distill.json), same
training windows (Austen train split, 256 tokens), same budget, batch 8 (4 × 2 accumulation),
AdamW lr 3e-4 with β₂ 0.95, 5 % warm-up then cosine to 10 %, gradient clipping 1.0, bf16
autocast when bench/distill.py used it. GKD runs off-policy (λ = 0, no sequence-level KD) with
β = ½, which is the same generalized JSD as compactor's ``gjsd`` row. The trained student is
scored with compactor's harness on the same evaluation windows. Appends a row to
bench/results/distill.json and rewrites bench/results/distill.md via bench/distill.py's table.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch
from _common import RESULTS

from compactor.data.windows import windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, TorchBackend
from compactor.models.load import load_model
from compactor.prune.structured import drop_layers

JSON = RESULTS / "distill.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--lr", type=float, default=3e-4)
    a = ap.parse_args()
    import trl
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = json.loads(JSON.read_text())
    ours = next(r for r in rows if r["row"] == "gjsd")
    teacher = load_model("smollm2-135m")
    tok = teacher.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = copy.deepcopy(teacher.model)
    drop_layers(student, ours["dropped"], teacher.adapter)
    student.train()
    ids = windows_for(tok, "austen:train", 256).input_ids
    steps = max(1, round(a.tokens / (8 * 256)))
    ds = Dataset.from_dict({"input_ids": ids.tolist()})

    def collate(batch):
        x = torch.tensor([b["input_ids"] for b in batch])
        ones = torch.ones_like(x)
        return {"input_ids": x, "attention_mask": ones, "labels": x.clone(),
                "prompts": x[:, :32], "prompt_attention_mask": ones[:, :32]}

    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         learning_rate=a.lr, lr_scheduler_type="cosine_with_min_lr",
                         lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=int(0.05 * steps),
                         adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, max_steps=steps,
                         lmbda=0.0, beta=0.5, seq_kd=False, use_cpu=True, bf16=ours["precision"] == "bf16",
                         report_to=[], save_strategy="no", logging_steps=8, seed=0,
                         dataloader_num_workers=0, max_length=256,
                         gradient_checkpointing=False)  # SFTConfig turns it on by default; ours is off
        trainer = GKDTrainer(model=student, teacher_model=teacher.model, args=args, train_dataset=ds,
                             data_collator=collate, processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
    student.eval()
    ev = windows_for(tok, "austen:eval", 256, max_tokens=a.eval_tokens)
    # A fresh teacher for scoring: accelerate prepares the training teacher in place.
    ref = CachedBackend(TorchBackend(load_model("smollm2-135m").model, "teacher"), half=True)
    res = evaluate(student, ev, reference=ref, speed=False, name="trl-gkd", progress=False)
    row = {"row": f"TRL {trl.__version__} GKD (λ=0, β=½)", "losses": {"gjsd": 1.0, "beta": 0.5},
           "tokens": steps * 8 * 256, "steps": steps, "train_seconds": round(secs, 1),
           "tok_s": round(steps * 8 * 256 / secs, 1), "precision": ours["precision"], "resumed_from": None,
           "params": sum(p.numel() for p in student.parameters()), "before": ours["before"],
           "after": {"step": steps, "ppl": res.ppl, "kld": res.kld_mean, "top1": res.top1,
                     "teacher_ppl": res.ref_ppl, "tokens": res.tokens}, "dropped": ours["dropped"]}
    rows = [r for r in rows if not r["row"].startswith("TRL")] + [row]
    JSON.write_text(json.dumps(rows, indent=1))
    print(row)


if __name__ == "__main__":
    main()
