"""The distillation loop: AdamW with linear warm-up and cosine decay, gradient accumulation,
optional bf16 autocast and gradient checkpointing, periodic evaluation, a JSONL log, exact
checkpoint/resume, and data parallelism under ``torchrun`` (DDP, gloo on CPU).

Determinism: the window order of epoch e is a permutation seeded by (seed, e); the windows of
step k are positions ``k·batch .. (k+1)·batch`` of that stream; on-policy draws are seeded by
(seed, step, rank). So a checkpoint needs only the step number besides the model, optimizer,
scheduler and RNG state, and a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compactor.distill.checkpoint import list_checkpoints, read_checkpoint, step_indices, write_checkpoint
from compactor.distill.config import DistillConfig
from compactor.distill.parallel import Parallel, dist_info
from compactor.distill.objective import (StudentWithHeads, teacher_hidden_index, term_means, term_sums,
                                         weighted_total)
from compactor.distill.student import Student
from compactor.distill.teacher import sample_continuations, windows_digest
from compactor.errors import CompactorError

_LOOP_FIELDS = ("eval_every", "eval_tokens", "eval_data", "checkpoint_every", "keep_checkpoints", "cache_dir")


@dataclass
class TrainResult:
    """What a run did: steps, tokens, speed, the final loss terms and every evaluation."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    resumed_from: int | None = None


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def use_bf16(precision: str) -> bool:
    """Whether ``precision`` (fp32 / bf16 / auto) means bf16 autocast on this machine."""
    return precision == "bf16" or (precision == "auto" and bf16_helps())


def bf16_helps() -> bool:
    """bf16 autocast pays on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def state_digest(module: torch.nn.Module) -> str:
    """Fingerprint of a model's weights (checkpoints refuse a different starting model)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes()[:4096])
        h.update(str(float(v.double().sum())).encode())
    return h.hexdigest()[:16]


class Distiller:
    """Train ``student`` against ``signal`` (a live teacher or a top-k cache) on ``train_ids``.

    ``workdir`` holds checkpoints and ``log.jsonl``; ``teacher_model`` (optional) is used for
    evaluation and on-policy scoring; ``reference`` (optional) is the evaluation's teacher
    backend instead (a streamed teacher's disk-cached logits). ``param_groups(model)`` (optional) chooses what trains:
    it sets ``requires_grad`` and returns the optimizer's parameter groups (QAT trains only the
    fake-quantized linears and their scales, at their own learning rates).
    """

    def __init__(self, student: Student, signal, cfg: DistillConfig, train_ids: torch.Tensor,
                 workdir: str | Path, teacher_model=None, eval_windows=None, progress: bool = True,
                 identity: dict | None = None, param_groups=None, reference=None):
        if train_ids.shape[0] < 1:
            raise CompactorError("distill: no training windows")
        self.cfg, self.signal, self.ids = cfg, signal, train_ids
        self.teacher_model = teacher_model or getattr(signal, "model", None)
        #: evaluation backend of the teacher (default: the teacher model, its logits cached)
        self._ref_backend = reference
        self.eval_windows, self.progress = eval_windows, progress
        self.workdir = Path(workdir)
        self.rank, self.world = dist_info()
        if cfg.batch % (self.world * cfg.micro_batch):
            raise CompactorError(f"distill.batch ({cfg.batch}) must be a multiple of processes × micro_batch "
                                 f"({self.world} × {cfg.micro_batch})")
        self.window = train_ids.shape[1]
        self.total_steps = max(1, round(cfg.tokens / (cfg.batch * self.window)))
        if cfg.tokens < cfg.batch * self.window // 2:
            raise CompactorError(f"distill.tokens={cfg.tokens} is less than half of one step "
                                 f"({cfg.batch} × {self.window} tokens)")
        self.autocast = use_bf16(cfg.precision)
        if cfg.attention:
            for m in (student.model, self.teacher_model):
                m.set_attn_implementation("eager")
        if cfg.gradient_checkpointing:
            kw = {"use_reentrant": False}
            if hasattr(student.model, "activation_checkpointing_enable"):  # the transformers 5.x name
                student.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        t_hidden = self.teacher_model.config.hidden_size if self.teacher_model is not None else student.model.config.hidden_size
        n_teacher = self.teacher_model.config.num_hidden_layers if self.teacher_model is not None else len(student.layer_map)
        student.model.requires_grad_(True)  # a copy of a frozen teacher starts frozen
        # Projections' and adapters' init from the run's seed, without touching the
        # process's global RNG (its state is restored when the block ends).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.lora_rank:
                student.model = _with_lora(student.model, cfg.lora_rank)
            self.net = StudentWithHeads(student.model, t_hidden, student.layer_map, cfg.needs_hidden).train()
        self.student = student
        self.t_index = teacher_hidden_index(student.layer_map, n_teacher)
        self.fingerprint = self._fingerprint(identity or {})
        from compactor.models.adapters import adapter_for, decoder_layers

        layers = decoder_layers(student.model, adapter_for(student.model)) if cfg.strategy == "fsdp" else None
        self.par = Parallel(self.net, cfg.strategy, self.world, self.rank, layers)
        groups = param_groups(student.model) if param_groups is not None else None
        if groups is not None:  # the heads (hidden-state projections) always train
            heads = [p for n, p in self.net.named_parameters() if not n.startswith("model.") and p.requires_grad]
            groups = list(groups) + ([{"params": heads}] if heads else [])
        self.opt = torch.optim.AdamW(groups if groups is not None else self.net.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        warm = int(cfg.warmup * self.total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, warm, cfg.min_lr_ratio))
        self.step = 0
        self.resumed_from = None

    # ---- identity and checkpoints -------------------------------------------------------
    def _fingerprint(self, identity: dict) -> str:
        run = {k: v for k, v in self.cfg.to_dict().items() if k not in _LOOP_FIELDS}
        blob = json.dumps({"cfg": run, "student": state_digest(self.net), "windows": windows_digest(self.ids),
                           **identity}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def ckpt_root(self) -> Path:
        return self.workdir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.ckpt_root)

    def save_checkpoint(self) -> None:
        if self.rank != 0 and not self.par.collective_io:
            return
        model_sd, opt_sd = self.par.full_state(self.opt)  # collective under FSDP
        if self.rank == 0:
            write_checkpoint(self.ckpt_root, self.step, model_sd, opt_sd, self.sched, self.fingerprint,
                             self.total_steps, self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        step, model_sd, extra = read_checkpoint(path, self.fingerprint)
        self.par.load_full_state(model_sd, self.opt, extra["optimizer"])
        self.sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        self.step = self.resumed_from = step

    # ---- data ---------------------------------------------------------------------------
    def windows_of_step(self, step: int) -> torch.Tensor:
        """Global window indices of ``step`` (epoch permutations seeded by (seed, epoch))."""
        return step_indices(len(self.ids), self.cfg.batch, step, self.cfg.seed)

    def _micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This process's micro-batches of ``step``: (window index, ids, trained-position mask)."""
        cfg = self.cfg
        idx = self.windows_of_step(step)
        per = cfg.batch // self.world
        idx = idx[self.rank * per:(self.rank + 1) * per]
        policy = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        on_policy = cfg.on_policy > 0 and float(torch.rand(1, generator=policy)) < cfg.on_policy
        out = []
        for i in range(0, per, cfg.micro_batch):
            w = idx[i:i + cfg.micro_batch]
            ids = self.ids[w]
            mask = torch.ones(len(w), self.window - 1, dtype=torch.bool)
            if on_policy:
                g = torch.Generator().manual_seed((cfg.seed * 7919 + step) * 131 + self.rank * 17 + i)
                ids = sample_continuations(self.net.model, ids[:, :cfg.prompt_len], self.window, g)
                mask[:, :cfg.prompt_len - 1] = False  # train only on the sampled continuation
            out.append((w, ids, mask))
        return out

    # ---- the loop -----------------------------------------------------------------------
    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def train_step(self) -> dict:
        """One optimizer step; returns the step's global loss terms (means over its tokens)."""
        cfg = self.cfg
        mbs = self._micro_batches(self.step)
        counts = self._all_sum(torch.tensor([float(sum(m.sum() for _, _, m in mbs)),
                                             float(sum(m.sum() + m[:, :1].sum() for _, _, m in mbs))],
                                            dtype=torch.float64))
        n_tok, n_pos = float(counts[0]), float(counts[1])
        need_t = cfg.needs_teacher_logits or cfg.needs_hidden or cfg.attention > 0
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        net = self.par.wrapped
        for j, (w, ids, mask) in enumerate(mbs):
            t = self.signal.targets(ids, w, hidden=cfg.needs_hidden, attentions=cfg.attention > 0) if need_t else None
            last = j == len(mbs) - 1
            with self.par.sync_context(last):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                    logits, hs, atts = net(ids, hidden=cfg.needs_hidden, attentions=cfg.attention > 0)
                terms = term_sums(cfg, logits, hs, atts, t or _NO_TEACHER, ids, mask, self.t_index)
                loss = weighted_total(cfg, terms, n_tok, n_pos)
                # DDP/FSDP average gradients over processes; the sums are already global-normalised.
                (loss * self.world).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        keys = sorted(sums)
        vals = self._all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        totals = {k: float(v) for k, v in zip(keys, vals)}
        rec = term_means(totals, n_tok, n_pos)
        rec["loss"] = weighted_total(cfg, totals, n_tok, n_pos)
        self.step += 1
        return rec

    def evaluate(self) -> dict:
        """PPL of the student and its KLD / top-1 agreement vs the teacher on held-out windows."""
        if self.eval_windows is None or (self.rank != 0 and not self.par.collective_io):
            return {}
        from compactor.evaluate.harness import evaluate

        self.net.eval()
        ref = getattr(self, "_ref_backend", None)
        if ref is None and self.teacher_model is not None:
            from compactor.evaluate.backends import CachedBackend, TorchBackend

            ref = self._ref_backend = CachedBackend(TorchBackend(self.teacher_model, "teacher"), half=True)
        res = evaluate(self.net.model, self.eval_windows, reference=ref, speed=False, name="student",
                       progress=False)
        self.net.train()
        if self.rank != 0:
            return {}  # FSDP: the other processes only took part in the forwards
        return {"step": self.step, "ppl": res.ppl, "kld": res.kld_mean, "top1": res.top1,
                "teacher_ppl": res.ref_ppl, "tokens": res.tokens}

    def train(self, resume: bool = False, on_step=None) -> TrainResult:
        """Run to the token budget. ``resume``: continue from the newest checkpoint in
        ``workdir``. ``on_step(distiller, record)`` is called after every step."""
        found = self.checkpoints()
        if found and not resume:
            raise CompactorError(f"{self.workdir} has checkpoints of an earlier run: resume it "
                                 "(--resume) or start over (--force)")
        if found:
            self.load_checkpoint(found[-1])
        log_path = self.workdir / "log.jsonl"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.resumed_from:
            self._trim_log(log_path)
        elif self.rank == 0:
            log_path.unlink(missing_ok=True)
        evals = [] if self.resumed_from else [e for e in [self.evaluate()] if e]
        if evals:
            self._log(log_path, {"eval": evals[-1]})
        t0, start_step, rec, step_secs = time.perf_counter(), self.step, {}, 0.0
        bar = tqdm(total=self.total_steps, initial=self.step, desc="distill", unit="step",
                   disable=not self.progress or self.rank != 0)
        while self.step < self.total_steps:
            t1 = time.perf_counter()
            rec = self.train_step()
            step_secs += time.perf_counter() - t1
            rec.update(step=self.step, lr=self.sched.get_last_lr()[0],
                       tok_s=self.cfg.batch * self.window / (time.perf_counter() - t1))
            self._log(log_path, rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                if e := self.evaluate():
                    evals.append(e)
                    self._log(log_path, {"eval": e})
            if on_step is not None:  # before the checkpoint, which must hold what it changed
                on_step(self, rec)
            if self.cfg.checkpoint_every and (self.step % self.cfg.checkpoint_every == 0
                                              or self.step == self.total_steps):
                self.save_checkpoint()
        bar.close()
        if e := self.evaluate():
            evals.append(e)
            self._log(log_path, {"eval": e})
        secs = time.perf_counter() - t0
        tokens = (self.step - start_step) * self.cfg.batch * self.window
        if self.par.sharded:  # gather the shards into an ordinary model
            self.student.model = self.net.model = self.par.plain_model(self.net.model)
        if self.cfg.lora_rank:  # fold the adapters in: the result is a plain transformers model
            self.student.model = self.net.model = self.net.model.merge_and_unload()
        self.net.model.eval()
        # tok/s counts optimizer steps only (evaluations and checkpoint writes excluded).
        return TrainResult(self.step, self.step * self.cfg.batch * self.window, secs,
                           tokens / step_secs if step_secs else 0.0, rec, evals, self.resumed_from)

    def _log(self, path: Path, rec: dict) -> None:
        if self.rank == 0:
            with path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def _trim_log(self, path: Path) -> None:
        """Drop log lines written after the checkpoint being resumed from."""
        if self.rank != 0 or not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines()
                if ln and json.loads(ln).get("step", json.loads(ln).get("eval", {}).get("step", 0)) <= self.step]
        path.write_text("".join(ln + "\n" for ln in keep))

    def cleanup(self) -> None:
        """Remove the checkpoints once the caller has saved the final model."""
        if self.rank == 0:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)


def _with_lora(model, rank: int):
    """Wrap ``model`` with LoRA adapters (Hu et al., 2021, arXiv:2106.09685) on every decoder
    linear; only the adapters train. B starts at zero, so the wrapped model starts unchanged."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise CompactorError("distill.lora_rank needs peft: pip install 'compactor[lora]'") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules="all-linear"))


class _NoTeacher:
    logits = top_idx = top_logp = hidden = attentions = None


_NO_TEACHER = _NoTeacher()
