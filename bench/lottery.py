"""The lottery ticket on a small model trained from scratch on Austen (byte-level tokens).

    python bench/lottery.py [--rounds 4] [--prune-per-round 0.5] [--steps 600]

A 2-layer, 64-wide Llama (byte vocabulary) is trained on the Austen training split; each
round removes half of the surviving decoder-linear weights by global magnitude, rewinds the
survivors to their values after 10 % of training, and retrains under the mask. The control
re-initialises at random (another seed) under the same mask and trains the same steps.
Loss: mean next-byte cross-entropy on held-out windows of the evaluation split.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import write_result
from transformers import AutoModelForCausalLM

from compactor.data.windows import windows_for
from compactor.models.tiny import tiny_config, tiny_tokenizer
from compactor.prune.lottery import LotteryConfig, lottery_ticket, prunable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prune-per-round", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-tokens", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model gains nothing from more)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = tiny_tokenizer()
    train = windows_for(tok, "austen:train", 64, max_tokens=args.train_tokens).input_ids
    ev = windows_for(tok, "austen:eval", 64, max_tokens=32_768).input_ids

    def fresh(seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config("llama", intermediate_size=256), dtype=torch.float32)

    cfg = LotteryConfig(rounds=args.rounds, prune_per_round=args.prune_per_round, steps=args.steps,
                        rewind_step=args.steps // 10, lr=3e-3, batch=32)
    t0 = time.perf_counter()
    model = fresh(0)
    n = sum(p.numel() for p in prunable(model).values())
    res = lottery_ticket(model, train, ev, cfg, make_fresh=lambda: fresh(1))
    rows = [f"| dense | 0 % | {res.dense_loss:.4f} | — |"]
    for r in res.rounds:
        rows.append(f"| round | {100 * r.sparsity:.1f} % | {r.ticket_loss:.4f} | {r.control_loss:.4f} |")
    body = (f"Model: 2 layers, 64 wide, MLP 256, byte vocabulary ({n:,} prunable decoder-linear weights); "
            f"AdamW lr {cfg.lr}, batch {cfg.batch} × 64 tokens, {cfg.steps} steps per training run; rewind to "
            f"step {cfg.rewind_step}; {len(train)} training windows (Austen train split), {len(ev)} evaluation "
            f"windows (Persuasion). Wall time {time.perf_counter() - t0:.0f} s.\n\n"
            "| run | sparsity | ticket loss (rewound) | control loss (random re-init, same mask) |\n"
            "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_result("lottery", "Lottery ticket: iterative magnitude pruning with rewind", body)
    print(body)


if __name__ == "__main__":
    main()
