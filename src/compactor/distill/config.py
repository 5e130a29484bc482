"""The ``distill`` step's configuration: teacher, student, objective, data and optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compactor.config import StepConfig, check


@dataclass(frozen=True)
class DistillConfig(StepConfig):
    """Train a student against a teacher.

    ``teacher``: ``original`` (the recipe's input model), ``current`` (the model as it is
    before this step: self- and progressive distillation), or a path/alias.
    ``student``: ``current`` (train the recipe's current model, e.g. after ``drop_layers``) or
    a spec of :func:`compactor.distill.student.build_student`.

    The objective is ``ce·CE + kl·T²·KL(P‖Q) + reverse_kl·KL(Q‖P) + gjsd·JSD_β + tv·TV
    + hidden_mse·MSE(proj(h_s), h_t) + hidden_cos·(1 − cos) + attention·KL(A_t‖A_s)``,
    each term averaged over the real tokens of the optimizer step.
    """

    name = "distill"
    teacher: str = "original"
    student: str = "current"
    # objective
    ce: float = 0.5
    kl: float = 0.5
    reverse_kl: float = 0.0
    gjsd: float = 0.0
    beta: float = 0.5
    tv: float = 0.0
    hidden_mse: float = 0.0
    hidden_cos: float = 0.0
    attention: float = 0.0
    temperature: float = 1.0
    # teacher signal
    signal: Literal["live", "cache"] = "live"
    #: read the teacher layer by layer from its safetensors shards (a teacher bigger than
    #: memory): it fills the top-k cache and the evaluation's logit cache, one layer at a time
    #: over all windows, and is never in memory whole nor beside the student
    teacher_stream: bool = False
    top_k: int = 64
    cache_dir: str | None = None
    sequence_kd: bool = False  # train on teacher-generated continuations of the data windows
    on_policy: float = 0.0  # fraction λ of steps trained on student samples scored by the teacher
    prompt_len: int = 32
    # data and budget
    data: str = "austen:train"
    tokens: int = 1_000_000
    window: int = 256
    batch: int = 16  # windows per optimizer step (global, across processes)
    micro_batch: int = 4  # windows per forward/backward
    # optimizer
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "auto"] = "auto"  # auto: bf16 autocast where the CPU has bf16 dot products
    gradient_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate, or shard the student
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) on every decoder linear, merged at the end
    seed: int = 0
    # bookkeeping
    eval_every: int = 0  # steps; 0 = only before and after
    eval_tokens: int = 8192
    eval_data: str = "austen:eval"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    def validate(self) -> None:
        check(self.tokens > 0, f"distill.tokens must be > 0, got {self.tokens}")
        for key in ("ce", "kl", "reverse_kl", "gjsd", "tv", "hidden_mse", "hidden_cos", "attention"):
            check(getattr(self, key) >= 0, f"distill.{key} is a loss weight and must be >= 0")
        check(self.ce + self.kl + self.reverse_kl + self.gjsd + self.tv + self.hidden_mse
              + self.hidden_cos + self.attention > 0, "distill: every loss weight is 0, nothing to train")
        check(0 <= self.beta <= 1, f"distill.beta must be in [0, 1], got {self.beta}")
        check(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")
        check(0 <= self.on_policy <= 1, f"distill.on_policy must be in [0, 1], got {self.on_policy}")
        check(self.window >= 2, f"distill.window must be >= 2, got {self.window}")
        if self.on_policy or self.sequence_kd:
            check(0 < self.prompt_len < self.window, f"distill.prompt_len must be in 1..{self.window - 1}")
        check(self.micro_batch >= 1 and self.batch >= 1, "distill.batch and micro_batch must be >= 1")
        check(self.batch % self.micro_batch == 0,
              f"distill.batch ({self.batch}) must be a multiple of micro_batch ({self.micro_batch})")
        check(not (self.strategy == "fsdp" and self.lora_rank), "distill: LoRA with FSDP is not supported; use ddp")
        check(self.lora_rank >= 0, f"distill.lora_rank must be >= 0, got {self.lora_rank}")
        check(self.top_k >= 1, f"distill.top_k must be >= 1, got {self.top_k}")
        check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "distill.lr must be > 0, min_lr_ratio in [0, 1]")
        check(0 <= self.warmup < 1, f"distill.warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        check(self.checkpoint_every >= 0 and self.keep_checkpoints >= 1,
              "distill.checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if self.signal == "cache":
            check(self.hidden_mse == self.hidden_cos == self.attention == 0,
                  "distill: a cached teacher keeps only top-k log-probs; hidden/attention losses need signal: live")
            check(self.reverse_kl == self.gjsd == self.tv == 0,
                  "distill: with signal: cache only kl (top-k forward KL) and ce are available")
            check(self.on_policy == 0, "distill: on-policy samples must be scored by a live teacher (signal: live)")
        if self.teacher_stream:
            check(self.signal == "cache", "distill.teacher_stream: a streamed teacher gives its signal "
                  "through the top-k cache (signal: cache)")
            check(not self.sequence_kd, "distill.teacher_stream: sequence_kd generates text token by token "
                  "and needs the teacher in memory")
            check(self.teacher != "current", "distill.teacher_stream: the current model is already in memory")
            check(self.student == "current", "distill.teacher_stream: the student must be the recipe's "
                  "current model (building one from the teacher's weights needs the teacher in memory)")

    @property
    def needs_hidden(self) -> bool:
        return self.hidden_mse > 0 or self.hidden_cos > 0

    @property
    def needs_teacher_logits(self) -> bool:
        return self.kl + self.reverse_kl + self.gjsd + self.tv > 0
