"""Lottery-ticket mechanics on a tiny model (the winning-ticket figures are a benchmark)."""

import torch
from transformers import AutoModelForCausalLM

from compactor.data.windows import windows_for
from compactor.models.tiny import tiny_config
from compactor.prune.lottery import LotteryConfig, lottery_ticket, magnitude_masks, prunable, train_masked


def _fresh(seed):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)


def test_masked_training_keeps_pruned_weights_zero(text_file, tok):
    ids = windows_for(tok, str(text_file), 32).input_ids
    m = _fresh(0)
    masks = magnitude_masks(m, 0.5, None, "layer")
    with torch.no_grad():
        for n, p in prunable(m).items():
            p.mul_(masks[n])
    train_masked(m, ids, steps=5, lr=1e-2, batch=4, seed=0, masks=masks)
    for n, p in prunable(m).items():
        w = p.detach()
        assert bool((w[~masks[n]] == 0).all()) and float(w[masks[n]].abs().min()) > 0
        assert abs((~masks[n]).float().mean().item() - 0.5) < 0.01


def test_rounds_compound_and_control_runs(text_file, tok):
    ids = windows_for(tok, str(text_file), 32).input_ids
    cfg = LotteryConfig(rounds=2, prune_per_round=0.5, steps=6, rewind_step=2, batch=4)
    m = _fresh(0)
    res = lottery_ticket(m, ids[4:], ids[:4], cfg, make_fresh=lambda: _fresh(1))
    assert [round(r.sparsity, 3) for r in res.rounds] == [0.5, 0.75]
    assert all(r.control_loss is not None and r.ticket_loss > 0 for r in res.rounds)
    total = sum(mk.numel() for mk in res.masks.values())
    kept = sum(int(mk.sum()) for mk in res.masks.values())
    assert abs(kept / total - 0.25) < 0.01
    # the model ends as the last ticket: its zeros are exactly the mask's
    for n, p in prunable(m).items():
        assert bool((p[~res.masks[n]] == 0).all())


def test_every_arm_gets_the_same_updates_and_batches(text_file, tok, monkeypatch):
    """Dense, rewound ticket and control: the same number of optimizer updates over the same
    batches of the seeded stream (the ticket's first rewind_step updates are the dense ones)."""
    import compactor.prune.lottery as lot

    ids = windows_for(tok, str(text_file), 32).input_ids
    cfg = LotteryConfig(rounds=1, prune_per_round=0.5, steps=6, rewind_step=2, batch=4)
    seen: list[list] = []
    real = lot._loss

    def spy(model, batch):
        if model.training:  # updates, not evaluations
            seen[-1].append(batch[:, :4].tolist())
        return real(model, batch)

    real_train = lot.train_masked

    def train(*a, **kw):
        seen.append([])
        return real_train(*a, **kw)

    monkeypatch.setattr(lot, "_loss", spy)
    monkeypatch.setattr(lot, "train_masked", train)
    lot.lottery_ticket(_fresh(0), ids[4:], ids[:4], cfg, make_fresh=lambda: _fresh(1))
    dense, ticket, control = seen
    assert len(dense) == len(control) == 6 and len(ticket) == 6 - 2
    assert ticket == dense[2:] and control == dense  # no batch replayed, none skipped
