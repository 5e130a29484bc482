"""Fine-tuning and task distillation of a classification model.

The objective (DistilBERT, Sanh et al., 2019; Hinton et al., 2015) per example:

    α · T² · KL(P_teacher,T ‖ Q_student,T)  +  (1 − α) · CE(y, Q_student)
    + w_cos · (1 − cos(h_s, h_t))                 (last hidden states, mean over real tokens)
    + w_att · KL(A_t ‖ A_s)                        (attention maps of mapped layers, per query)

α = 0 and no teacher is plain fine-tuning. Teacher logits are computed once and kept when only
they are needed (the teacher is frozen and dropout is off, so they never change); hidden-state
and attention terms run the teacher live. AdamW with linear warm-up and cosine decay, a JSONL
log, dev evaluation per epoch, and exact resume from checkpoints (:mod:`compactor.distill.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compactor.distill.checkpoint import list_checkpoints, read_checkpoint, step_indices, write_checkpoint
from compactor.distill.losses import attention_kl, cross_entropy, forward_kl, hidden_cosine
from compactor.distill.trainer import lr_factor, state_digest
from compactor.config import StepConfig, check
from compactor.errors import CompactorError
from compactor.task.batches import Encoded
from compactor.task.model import TaskModel


@dataclass(frozen=True)
class TaskTrainConfig(StepConfig):
    """Settings of one fine-tuning or task-distillation run (typed and range-checked; unknown
    keys are refused by :meth:`from_dict`)."""

    name = "task_distill"
    epochs: float = 2.0
    batch: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    min_lr_ratio: float = 0.0
    alpha: float = 0.0          # weight of the soft-target KL (0: labels only)
    temperature: float = 2.0
    cosine: float = 0.0         # weight of the hidden-state cosine loss
    attention: float = 0.0      # weight of attention-map transfer
    max_length: int = 128
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    grad_clip: float = 1.0
    #: batches drawn together and grouped by length, so a batch pads little (0: off)
    bucket: int = 50

    def validate(self) -> None:
        check(0.0 <= self.alpha <= 1.0, f"task_distill.alpha must be in [0, 1], got {self.alpha}")
        for key in ("epochs", "lr", "temperature"):
            check(getattr(self, key) > 0, f"task_distill.{key} must be positive, got {getattr(self, key)}")
        check(self.batch >= 1 and self.max_length >= 4 and self.bucket >= 0,
              "task_distill.batch must be >= 1, max_length >= 4 and bucket >= 0")
        check(min(self.cosine, self.attention, self.head_lr, self.weight_decay) >= 0,
              "task_distill.cosine / attention / head_lr / weight_decay must be >= 0")

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.cosine > 0 or self.attention > 0

    @property
    def live_teacher(self) -> bool:
        return self.cosine > 0 or self.attention > 0


def bucketed_indices(lengths: list[int], batch: int, step: int, seed: int, group: int) -> torch.Tensor:
    """Example indices of ``step`` when ``group`` consecutive batches of the seeded epoch order
    are drawn together, sorted by length and cut into batches, whose order within the group
    is shuffled (seeded): each batch holds texts of similar length, so padding costs little,
    and the step number still determines the batch (exact resume)."""
    if group <= 1:
        return step_indices(len(lengths), batch, step, seed)
    g, j = divmod(step, group)
    pool = step_indices(len(lengths), batch * group, g, seed)
    pool = pool[torch.as_tensor(sorted(range(len(pool)), key=lambda i: lengths[int(pool[i])]))]
    order = torch.randperm(group, generator=torch.Generator().manual_seed(seed * 7919 + g))
    k = int(order[j])
    return pool[k * batch:(k + 1) * batch]


@torch.no_grad()
def teacher_logits(teacher: TaskModel, data: Encoded, batch: int = 64) -> torch.Tensor:
    """``[N, labels]`` logits of the frozen teacher on every example (length-sorted batches)."""
    teacher.eval()
    out = torch.empty(len(data), len(teacher.labels))
    for idx in data.by_length(batch):
        ids, mask, _ = data.batch(idx)
        out[torch.as_tensor(idx)] = teacher(ids, mask).logits.float()
    return out


def cached_teacher_logits(teacher: TaskModel, data: Encoded) -> torch.Tensor:
    """:func:`teacher_logits`, kept under ``$COMPACTOR_HOME/teacher-cache`` keyed by the
    teacher's weights and the token ids, so students of one teacher compute them once."""
    from safetensors.torch import load_file, save_file

    from compactor.io import atomic_file, home

    h = hashlib.sha256(state_digest(teacher).encode())
    for row in data.ids:
        h.update(bytes(str(row), "ascii"))
    path = home() / "teacher-cache" / f"task-{h.hexdigest()[:24]}.safetensors"
    if path.exists():
        return load_file(str(path))["logits"]
    logits = teacher_logits(teacher, data)
    with atomic_file(path) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp))
    return logits


class TaskTrainer:
    """Train ``student`` on ``train`` (optionally against ``teacher``; ``layer_map[i]`` is the
    teacher layer student layer i was initialized from, for attention transfer).
    ``teacher_train``: the same examples in the teacher's tokenization when the student's
    differs (a trimmed vocabulary); its soft targets are per example, so they still align."""

    def __init__(self, student: TaskModel, train: Encoded, cfg: TaskTrainConfig, workdir: str | Path,
                 teacher: TaskModel | None = None, dev: Encoded | None = None, layer_map: list[int] | None = None,
                 progress: bool = True, teacher_train: Encoded | None = None):
        if cfg.needs_teacher and teacher is None:
            raise CompactorError("task distillation with alpha / cosine / attention > 0 needs a teacher")
        if teacher is not None and teacher.labels != student.labels:
            raise CompactorError(f"teacher labels {teacher.labels} differ from the student's {student.labels}")
        if cfg.cosine and teacher.config.hidden_size != student.config.hidden_size:
            raise CompactorError("the cosine loss needs the student's hidden size to equal the teacher's")
        if teacher_train is not None and (len(teacher_train) != len(train) or cfg.live_teacher):
            raise CompactorError("a teacher tokenization of its own takes the same examples and logit KD only "
                                 "(hidden-state and attention losses need one tokenization)")
        self.student, self.teacher, self.train, self.dev, self.cfg = student, teacher, train, dev, cfg
        self.teacher_train = teacher_train if teacher_train is not None else train
        self.layer_map = layer_map or list(range(student.config.num_hidden_layers))
        self.workdir, self.progress = Path(workdir), progress
        self.total_steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch))
        if cfg.attention:
            for m in (student, teacher):
                m.encoder.set_attn_implementation("eager")  # sdpa returns no attention maps
        head = [p for n, p in student.named_parameters() if n.startswith("head.")]
        body = [p for n, p in student.named_parameters() if not n.startswith("head.")]
        self.opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                                     weight_decay=cfg.weight_decay)
        warm = int(cfg.warmup * self.total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, warm, cfg.min_lr_ratio))
        self.step, self.resumed_from = 0, None
        self.fingerprint = self._fingerprint()
        self._soft = None
        self._lengths = [len(r) for r in train.ids]

    def _fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        h.update(state_digest(self.student).encode())
        h.update((state_digest(self.teacher) if self.teacher is not None else "-").encode())
        h.update(str(len(self.train)).encode())
        h.update(str(self.train.ids[:64]).encode())
        h.update(str(self.train.labels.tolist()).encode())
        return h.hexdigest()[:16]

    # ---- one step -----------------------------------------------------------------------
    def loss_terms(self, idx: torch.Tensor) -> dict:
        """The loss terms (means over the batch) of the examples ``idx``."""
        cfg = self.cfg
        ids, mask, y = self.train.batch(idx)
        out = self.student(ids, mask, hidden=cfg.cosine > 0, attentions=cfg.attention > 0)
        terms = {"ce": cross_entropy(out.logits, y).mean()}
        if cfg.needs_teacher:
            if cfg.live_teacher:
                with torch.no_grad():
                    t = self.teacher(ids, mask, hidden=cfg.cosine > 0, attentions=cfg.attention > 0)
                t_logits = t.logits
            else:
                t_logits = self._soft[idx]
            if cfg.alpha:
                terms["kd"] = forward_kl(out.logits, t_logits, cfg.temperature).mean() * cfg.temperature ** 2
            real = mask.to(torch.float32)                             # [B, T]
            if cfg.cosine:
                per = hidden_cosine(out.hidden[-1], t.hidden[-1])    # [B, T]
                terms["cos"] = (per * real).sum() / real.sum()
            if cfg.attention:
                per = torch.stack([attention_kl(out.attentions[i], t.attentions[j])
                                   for i, j in enumerate(self.layer_map)]).mean(0)  # [B, T]
                terms["att"] = (per * real).sum() / real.sum()
        return terms

    def total(self, terms: dict) -> torch.Tensor:
        cfg = self.cfg
        loss = (1 - cfg.alpha) * terms["ce"] + cfg.alpha * terms.get("kd", 0.0)
        return loss + cfg.cosine * terms.get("cos", 0.0) + cfg.attention * terms.get("att", 0.0)

    def train_step(self) -> dict:
        idx = bucketed_indices(self._lengths, self.cfg.batch, self.step, self.cfg.seed, self.cfg.bucket)
        self.opt.zero_grad(set_to_none=True)
        terms = self.loss_terms(idx)
        loss = self.total(terms)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                "lr": self.sched.get_last_lr()[0]}

    # ---- the loop -----------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Train to ``epochs``; returns the run's record (steps, seconds, dev scores per epoch)."""
        from compactor.task.evaluate import predict_torch

        root = self.workdir / "checkpoints"
        found = list_checkpoints(root)
        if found and not resume:
            raise CompactorError(f"{self.workdir} has checkpoints of an earlier run: resume it "
                                 "(--resume) or start over (--force)")
        if found:
            self.step, sd, extra = read_checkpoint(found[-1], self.fingerprint)
            self.student.load_state_dict(sd)
            self.opt.load_state_dict(extra["optimizer"])
            self.sched.load_state_dict(extra["scheduler"])
            torch.set_rng_state(extra["rng"])
            self.resumed_from = self.step
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "log.jsonl"
        if not self.resumed_from:
            log.unlink(missing_ok=True)
        t0 = time.perf_counter()
        if self.cfg.needs_teacher and not self.cfg.live_teacher:
            self._soft = cached_teacher_logits(self.teacher, self.teacher_train)
        teacher_secs = time.perf_counter() - t0
        per_epoch = max(1, math.ceil(len(self.train) / self.cfg.batch))
        evals = []
        bar = tqdm(total=self.total_steps, initial=self.step, desc="task-train", unit="step",
                   disable=not self.progress)
        self.student.train()
        while self.step < self.total_steps:
            rec = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if self.dev is not None and (self.step % per_epoch == 0 or self.step == self.total_steps):
                self.student.eval()
                e = {"step": self.step, **predict_torch(self.student, self.dev).scores}
                self.student.train()
                evals.append(e)
                rec["dev"] = {k: e[k] for k in ("accuracy", "macro_f1")}
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.cfg.checkpoint_every and (self.step % self.cfg.checkpoint_every == 0
                                              or self.step == self.total_steps):
                write_checkpoint(root, self.step, self.student.state_dict(), self.opt.state_dict(), self.sched,
                                 self.fingerprint, self.total_steps, self.cfg.keep_checkpoints)
        bar.close()
        self.student.eval()
        return {"steps": self.step, "total_steps": self.total_steps, "seconds": time.perf_counter() - t0,
                "teacher_logits_seconds": teacher_secs, "resumed_from": self.resumed_from,
                "examples": len(self.train), "dev": evals, "config": self.cfg.to_dict()}

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.workdir / "checkpoints", ignore_errors=True)
