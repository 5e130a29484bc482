"""The weighted distillation objective over one micro-batch, as *sums* over real tokens.

The trainer adds the sums of every micro-batch (and process) of an optimizer step and divides
each term once by that step's token count, so accumulation never changes the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from compactor.distill import losses as L
from compactor.distill.config import DistillConfig
from compactor.distill.teacher import TeacherOut


class StudentWithHeads(nn.Module):
    """The student plus the learned projections of the hidden-state losses (one per student
    layer, only when the widths differ). One module, so DDP and checkpoints see both."""

    def __init__(self, model, teacher_hidden: int, layer_map: list[int], hidden: bool):
        super().__init__()
        self.model = model
        self.layer_map = list(layer_map)
        d_s = model.config.hidden_size
        self.proj = nn.ModuleList(
            nn.Linear(d_s, teacher_hidden, bias=False) for _ in layer_map
        ) if hidden and d_s != teacher_hidden else None

    def forward(self, ids: torch.Tensor, hidden: bool = False, attentions: bool = False):
        out = self.model(input_ids=ids, output_hidden_states=hidden, output_attentions=attentions,
                         use_cache=False)
        hs = None
        if hidden:
            # hidden_states[j + 1] is layer j's output (the last one after the final norm).
            hs = [out.hidden_states[j + 1] for j in range(len(self.layer_map))]
            if self.proj is not None:
                hs = [p(h) for p, h in zip(self.proj, hs)]
        return out.logits, hs, out.attentions


def teacher_hidden_index(layer_map: list[int], n_teacher: int) -> list[int]:
    """Index into the teacher's ``hidden_states`` for each student layer: the output of the
    mapped layer, except that the student's last (final-normed) output imitates the
    teacher's final-normed output."""
    idx = [m + 1 for m in layer_map]
    idx[-1] = n_teacher
    return idx


def term_sums(cfg: DistillConfig, logits: torch.Tensor, hs, atts, t: TeacherOut, ids: torch.Tensor,
              mask: torch.Tensor, t_index: list[int]) -> dict[str, torch.Tensor]:
    """Sum of each active loss term over the real tokens of one micro-batch.

    ``logits [B, T, V]`` student; ``ids [B, T]``; ``mask [B, T-1]`` marks the positions whose
    next token is trained on. Feature terms use the positions ``[B, T]`` (mask extended left).
    """
    s, labels, T = logits[:, :-1], ids[:, 1:], cfg.temperature
    out: dict[str, torch.Tensor] = {}
    if cfg.ce:
        out["ce"] = L.masked_sum(L.cross_entropy(s, labels), mask)
    if t.logits is not None:
        tl = t.logits[:, :-1]
        if cfg.kl:
            out["kl"] = L.masked_sum(L.forward_kl(s, tl, T), mask) * T ** 2
        if cfg.reverse_kl:
            out["reverse_kl"] = L.masked_sum(L.reverse_kl(s, tl, T), mask) * T ** 2
        if cfg.gjsd:
            out["gjsd"] = L.masked_sum(L.generalized_jsd(s, tl, cfg.beta, T), mask) * T ** 2
        if cfg.tv:
            out["tv"] = L.masked_sum(L.total_variation(s, tl, T), mask)
    elif cfg.kl:
        out["kl"] = L.masked_sum(L.topk_forward_kl(s, t.top_idx[:, :-1], t.top_logp[:, :-1]), mask)
    pos_mask = torch.cat([mask[:, :1], mask], 1)
    if hs is not None:
        n = len(hs)
        if cfg.hidden_mse:
            out["hidden_mse"] = sum(L.masked_sum(L.hidden_mse(h, t.hidden[i]), pos_mask)
                                    for h, i in zip(hs, t_index)) / n
        if cfg.hidden_cos:
            out["hidden_cos"] = sum(L.masked_sum(L.hidden_cosine(h, t.hidden[i]), pos_mask)
                                    for h, i in zip(hs, t_index)) / n
    if atts is not None and cfg.attention:
        # Attention map of teacher layer m (0-based) for the student's layer j.
        pairs = [(a, t.attentions[i - 1]) for a, i in zip(atts, t_index)]
        out["attention"] = sum(L.masked_sum(L.attention_kl(a, b), pos_mask) for a, b in pairs) / len(pairs)
    return out


FEATURE_TERMS = ("hidden_mse", "hidden_cos", "attention")


def term_means(sums: dict, n_tok: float, n_pos: float) -> dict:
    """Each term's sum divided by its count over the whole optimizer step (feature terms count
    positions, logit terms count predicted tokens)."""
    return {k: v / (n_pos if k in FEATURE_TERMS else n_tok) for k, v in sums.items()}


def weighted_total(cfg: DistillConfig, sums: dict, n_tok: float, n_pos: float):
    """``Σ weight · sum / count`` over the active terms (tensors for backward, floats for logs)."""
    return sum(getattr(cfg, k) * v for k, v in term_means(sums, n_tok, n_pos).items())
