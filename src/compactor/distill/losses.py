"""Distillation losses: pure functions on logits and hidden states.

Every divergence takes student and teacher logits ``[..., V]`` (already aligned: the same row
predicts the same next token) and returns a **per-token** value ``[...]`` in nats. Reduction is
separate (:func:`masked_sum`): the trainer sums over the real tokens of every micro-batch and
divides once by the token count of the whole optimizer step, so gradient accumulation and
data parallelism give the same gradient as one big batch.

Conventions (P = teacher, Q = student):

* ``forward_kl``  KL(P‖Q): mode-covering, the classic KD term (Hinton et al., 2015,
  arXiv:1503.02531), scaled by T² in :func:`kd_loss` so its gradient keeps its size as T grows.
* ``reverse_kl``  KL(Q‖P): mode-seeking (MiniLLM, Gu et al., 2024, arXiv:2306.08543).
* ``generalized_jsd``  the GKD form (Agarwal et al., 2024, arXiv:2306.13649)
  ``β·KL(P‖M) + (1−β)·KL(Q‖M)`` with ``M = β·P + (1−β)·Q``; β=0 is defined as forward KL and
  β=1 as reverse KL (the normalized limits ``JSD_β/β → KL(P‖Q)`` and ``JSD_β/(1−β) → KL(Q‖P)``).
* ``total_variation``  ½·Σ|P−Q|.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _logp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    # At least float32 even under bf16 autocast: the divergences subtract near-equal logs.
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(x / temperature, dim=-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P_teacher ‖ Q_student) per token at ``temperature``: ``[..., V] -> [...]``."""
    lp, lq = _logp(teacher, temperature), _logp(student, temperature)
    return (lp.exp() * (lp - lq)).sum(-1)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(Q_student ‖ P_teacher) per token: ``[..., V] -> [...]``."""
    lp, lq = _logp(teacher, temperature), _logp(student, temperature)
    return (lq.exp() * (lq - lp)).sum(-1)


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence per token (see the module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD needs beta in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student, teacher, temperature)
    if beta == 1.0:
        return reverse_kl(student, teacher, temperature)
    lp, lq = _logp(teacher, temperature), _logp(student, temperature)
    # log M = log(β·P + (1−β)·Q), computed in log space for stability.
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
    kl_pm = (lp.exp() * (lp - lm)).sum(-1)
    kl_qm = (lq.exp() * (lq - lm)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def total_variation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance ½·Σ|P−Q| per token (bounded in [0, 1])."""
    p, q = _logp(teacher, temperature).exp(), _logp(student, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def cross_entropy(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label NLL per token: logits ``[..., V]``, labels ``[...]`` -> ``[...]``."""
    lq = _logp(student)
    return -lq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def topk_forward_kl(student: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) against a cached teacher that kept only its top-k log-probs per token.

    ``top_idx``/``top_logp`` ``[..., k]`` are the teacher's k most likely tokens and their
    (full-softmax, T=1) log-probs. The teacher's remaining mass ``1 − Σ p_k`` and the student's
    mass outside those k tokens form one extra "tail" bucket, so this is the exact KL between
    the two (k+1)-bucket coarsenings — a lower bound on the full KL that tightens as k grows.
    """
    lq = _logp(student)
    lq_k = lq.gather(-1, top_idx)                                  # [..., k]
    p_k = top_logp.float().exp()
    tail_p = (1 - p_k.sum(-1)).clamp_min(0)
    tail_q = (1 - lq_k.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_k * (top_logp.float() - lq_k)).sum(-1)
    return kl + torch.where(tail_p > 0, tail_p * (tail_p.clamp_min(1e-12).log() - tail_q.log()),
                            torch.zeros_like(tail_p))


def hidden_mse(student_h: torch.Tensor, teacher_h: torch.Tensor,
               projection: torch.nn.Module | None = None) -> torch.Tensor:
    """Relative squared error per token, ``‖proj(h_s) − h_t‖² / ‖h_t‖²``, between hidden states
    ``[..., d_s]`` and ``[..., d_t]``. ``projection`` (a learned ``d_s -> d_t`` linear, FitNets,
    Romero et al., 2015) maps the student into the teacher's space when the widths differ.

    Why relative: residual streams of LLMs carry a few huge "massive activation" dimensions
    (raw MSE on SmolLM2 is ~2000 at init), which would swamp the logit terms; dividing by the
    teacher's norm makes the term scale-free, comparable across layers and with the KL."""
    h = projection(student_h) if projection is not None else student_h
    t = teacher_h.float()
    return (h.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)


def hidden_cosine(student_h: torch.Tensor, teacher_h: torch.Tensor,
                  projection: torch.nn.Module | None = None) -> torch.Tensor:
    """DistilBERT's cosine embedding loss per token: ``1 − cos(h_s, h_t)`` (Sanh et al., 2019)."""
    h = projection(student_h) if projection is not None else student_h
    return 1 - F.cosine_similarity(h.float(), teacher_h.float(), dim=-1, eps=1e-8)


def attention_kl(student_att: torch.Tensor, teacher_att: torch.Tensor) -> torch.Tensor:
    """Attention-map transfer per query position: KL between the teacher's and the student's
    attention distributions over keys, averaged over heads first so head counts may differ
    (MiniLM-style, Wang et al., 2020). ``[B, H, T, T] -> [B, T]``."""
    p = teacher_att.float().mean(1).clamp_min(1e-12)
    q = student_att.float().mean(1).clamp_min(1e-12)
    # Causal maps are exactly zero above the diagonal in both: those terms contribute 0.
    return (p * (p.log() - q.log())).sum(-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of per-token ``values`` over the real tokens (``mask`` True)."""
    return values.sum() if mask is None else (values * mask.to(values.dtype)).sum()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
            mask: torch.Tensor | None = None, alpha: float = 0.5, temperature: float = 2.0) -> torch.Tensor:
    """The classic mixed objective, averaged over real tokens:
    ``α · T² · KL(P_T ‖ Q_T) + (1 − α) · CE(labels, Q)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd_loss needs alpha in [0, 1], got {alpha}")
    per = (alpha * temperature ** 2 * forward_kl(student, teacher, temperature)
           + (1 - alpha) * cross_entropy(student, labels))
    n = per.numel() if mask is None else mask.sum().clamp_min(1)
    return masked_sum(per, mask) / n
