"""The lottery-ticket procedure (Frankle & Carbin, 2019, arXiv:1803.03635; with the
"late rewinding" of Frankle et al., 2020, arXiv:1912.05671): iterative magnitude pruning
with rewind.

Train the dense network, remembering its weights after ``rewind_step`` steps. Each round
removes ``prune_per_round`` of the surviving decoder-linear weights by global magnitude,
resets the survivors to the remembered early weights and retrains under the mask. The
control trains a *fresh random initialisation* under the same mask for the same steps: a
ticket is a winning one when it reaches the dense loss and the control does not.

The short trainer here (AdamW, constant learning rate, masked updates) is for small models;
distillation has the full trainer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from compactor.config import StepConfig, check
from compactor.primitives.masks import global_threshold


@dataclass(frozen=True)
class LotteryConfig(StepConfig):
    """Iterative magnitude pruning with rewind; ``data``/``tokens``/``window`` the training text."""

    name = "lottery_ticket"
    rounds: int = 3
    prune_per_round: float = 0.2
    rewind_step: int = 50
    steps: int = 400
    lr: float = 3e-3
    batch: int = 16
    seed: int = 0
    data: str = "austen:train"
    tokens: int = 200_000
    window: int = 64
    eval_fraction: float = 0.05
    control: bool = True
    scope: Literal["global", "layer"] = "global"

    def validate(self) -> None:
        check(self.rounds >= 1, f"lottery_ticket.rounds must be >= 1, got {self.rounds}")
        check(0 < self.prune_per_round < 1, f"lottery_ticket.prune_per_round must be in (0, 1), got {self.prune_per_round}")
        check(0 <= self.rewind_step < self.steps, "lottery_ticket.rewind_step must be in [0, steps)")


@dataclass
class Round:
    sparsity: float
    ticket_loss: float
    control_loss: float | None = None


@dataclass
class LotteryResult:
    dense_loss: float
    rounds: list[Round] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


def prunable(model) -> dict[str, torch.nn.Parameter]:
    """Decoder linear weights (the embedding / tied head stay dense)."""
    return {n: m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head" and m.weight is not getattr(
                model.get_input_embeddings(), "weight", None)}


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    losses = [float(_loss(model, ids[i:i + batch])) * len(ids[i:i + batch]) for i in range(0, len(ids), batch)]
    return sum(losses) / len(ids)


def train_masked(model, ids: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
                 masks: dict[str, torch.Tensor] | None = None, save_at: int | None = None,
                 desc: str = "train", start_step: int = 0) -> dict[str, torch.Tensor] | None:
    """Train ``model`` on windows ``ids [N, T]`` for steps ``start_step .. steps - 1`` of the
    seeded batch stream (a rewound ticket continues where its rewind point was, so every arm
    sees the same batches and makes the same number of updates); pruned weights stay
    exactly zero. Returns the state dict at step ``save_at`` (for rewinding) if asked."""
    params = prunable(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(start_step):  # the batches the rewound weights were already trained on
        torch.randint(0, len(ids), (batch,), generator=g)
    saved = copy.deepcopy(model.state_dict()) if save_at == 0 else None
    model.train()
    for step in tqdm(range(start_step, steps), desc=desc, leave=False):
        idx = torch.randint(0, len(ids), (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        _loss(model, ids[idx]).backward()
        opt.step()
        if masks:
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].mul_(m)
        if save_at is not None and step + 1 == save_at:
            saved = copy.deepcopy(model.state_dict())
    model.eval()
    return saved


def magnitude_masks(model, sparsity: float, masks: dict[str, torch.Tensor] | None, scope: str) -> dict[str, torch.Tensor]:
    """Masks removing ``sparsity`` of all prunable weights by |W| (pruned ones stay pruned)."""
    params = prunable(model)
    scores = {n: p.detach().abs() * (masks[n] if masks else 1) for n, p in params.items()}
    if scope == "global":
        t = global_threshold(list(scores.values()), sparsity)
        return {n: s > t for n, s in scores.items()}
    out = {}
    for n, s in scores.items():
        t = global_threshold([s], sparsity)
        out[n] = s > t
    return out


def lottery_ticket(model, train_ids: torch.Tensor, eval_ids: torch.Tensor, cfg: LotteryConfig,
                   make_fresh=None) -> LotteryResult:
    """Run the procedure on ``model`` in place (it ends as the last round's trained ticket).
    ``make_fresh()`` returns a freshly initialised model of the same shape (the control)."""
    rewind = train_masked(model, train_ids, cfg.steps, cfg.lr, cfg.batch, cfg.seed,
                          save_at=cfg.rewind_step, desc="dense")
    result = LotteryResult(dense_loss=eval_loss(model, eval_ids))
    masks = None
    keep = 1.0
    for r in range(cfg.rounds):
        keep *= 1 - cfg.prune_per_round
        masks = magnitude_masks(model, 1 - keep, masks, cfg.scope)
        model.load_state_dict(rewind)
        with torch.no_grad():
            for n, p in prunable(model).items():
                p.mul_(masks[n])
        # From the rewind point on: rewind_step dense + (steps - rewind_step) masked updates,
        # the same batches and the same count as the dense run and the control.
        train_masked(model, train_ids, cfg.steps, cfg.lr, cfg.batch, cfg.seed, masks, desc=f"ticket {r + 1}",
                     start_step=cfg.rewind_step)
        rnd = Round(sparsity=1 - keep, ticket_loss=eval_loss(model, eval_ids))
        if cfg.control and make_fresh is not None:
            ctrl = make_fresh()
            with torch.no_grad():
                for n, p in prunable(ctrl).items():
                    p.mul_(masks[n])
            train_masked(ctrl, train_ids, cfg.steps, cfg.lr, cfg.batch, cfg.seed, masks, desc=f"control {r + 1}")
            rnd.control_loss = eval_loss(ctrl, eval_ids)
        result.rounds.append(rnd)
    result.masks = masks or {}
    return result


def _lottery_step(ctx, cfg: LotteryConfig) -> None:
    """Recipe step: the ticket procedure on the recipe's model; the model ends as the ticket."""
    from transformers import AutoModelForCausalLM

    from compactor.data.windows import windows_for

    model, tok = ctx.loaded.model, ctx.loaded.tokenizer
    win = windows_for(tok, cfg.data, cfg.window, max_tokens=cfg.tokens)
    n_eval = max(1, int(len(win) * cfg.eval_fraction))
    ids = win.input_ids[torch.randperm(len(win), generator=torch.Generator().manual_seed(cfg.seed))]

    def fresh():
        # A seeded random init that leaves the process's global RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            return AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)

    res = lottery_ticket(model, ids[n_eval:], ids[:n_eval], cfg, make_fresh=fresh)
    ctx.reports.append({"step": cfg.name, "dense_loss": res.dense_loss,
                        "rounds": [vars(r) for r in res.rounds]})


def _register() -> None:
    from compactor.registry import register

    register(LotteryConfig, kind="model")(_lottery_step)


_register()
