"""Recipe step ``distill``: resolve the teacher and the student, prepare the training data
and teacher signal, and run the :class:`~compactor.distill.trainer.Distiller`.

After the step the recipe's current model is the trained student, so later steps (quantize,
export) compress it. Progressive distillation is two ``distill`` steps, the second with
``teacher: current``; self-distillation is ``teacher: current`` with ``student: random`` (born
again) or ``student: current``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from compactor.data.windows import domain_windows, windows_for
from compactor.distill.config import DistillConfig
from compactor.distill.student import Student, build_student, check_vocab, uniform_layer_map
from compactor.distill.teacher import LiveTeacher, TopKCache, generate_windows, windows_digest
from compactor.distill.trainer import Distiller, state_digest, use_bf16
from compactor.registry import register


def _teacher(ctx, cfg: DistillConfig):
    """(teacher model, identity string); with ``teacher_stream`` the model is a streamed
    :class:`~compactor.models.load.LoadedModel` (a skeleton whose layers stay on disk)."""
    if cfg.teacher_stream:
        from compactor.models.load import load_model

        loaded = load_model(ctx.recipe.model if cfg.teacher == "original" else cfg.teacher, stream=True)
        check_vocab(ctx.loaded.model, loaded.model, ctx.loaded.tokenizer, loaded.tokenizer)
        return loaded, cfg.teacher if cfg.teacher != "original" else ctx.recipe.model
    if cfg.teacher == "original":
        # The recipe's reference is the original only when it says so (it may be another model).
        ref = ctx.reference() if ctx.recipe.reference == "original" else None
        if ref is None:
            from compactor.models.load import load_model

            ref = load_model(ctx.recipe.model)
        return ref.model, ctx.recipe.model
    if cfg.teacher == "current":
        return copy.deepcopy(ctx.loaded.model).eval(), f"current@{ctx.stage}"
    from compactor.models.load import load_model

    loaded = load_model(cfg.teacher)
    check_vocab(ctx.loaded.model, loaded.model, ctx.loaded.tokenizer, loaded.tokenizer)
    return loaded.model, cfg.teacher


def _student(ctx, cfg: DistillConfig, teacher) -> Student:
    n_t = teacher.config.num_hidden_layers
    if cfg.student == "current":
        model = ctx.loaded.model
        check_vocab(model, teacher)
        origin = ctx.layer_origin if cfg.teacher == "original" else None
        n_s = model.config.num_hidden_layers
        layer_map = list(origin) if origin and len(origin) == n_s else uniform_layer_map(n_s, n_t)
        return Student(model.train(), layer_map, ["the recipe's current model"])
    return build_student(teacher, cfg.student, ctx.calib_windows(), ctx.loaded.adapter,
                         ctx.loaded.tokenizer)


def train_windows(ctx, cfg: DistillConfig, teacher, workdir: Path, progress: bool) -> torch.Tensor:
    """The training windows; with ``sequence_kd`` the teacher's continuations of them
    (generated once, kept in ``workdir`` for a resumed run)."""
    from compactor.data.windows import MIX_SPEC

    # The mix is sized by request (its default is a calibration set): one epoch of the budget.
    cap = max(cfg.tokens, cfg.batch * cfg.window) if cfg.data == MIX_SPEC else None
    win = windows_for(ctx.loaded.tokenizer, cfg.data, cfg.window, max_tokens=cap)
    ids = win.input_ids
    if not cfg.sequence_kd:
        return ids
    from safetensors.torch import load_file, save_file

    path = workdir / f"generated-{windows_digest(ids)}.safetensors"
    if path.exists():
        return load_file(str(path))["ids"]
    need = min(len(ids), -(-cfg.tokens // cfg.window))  # one epoch of the budget is enough
    gen = generate_windows(teacher, ids[:need], cfg.prompt_len, cfg.seed, progress=progress)
    workdir.mkdir(parents=True, exist_ok=True)
    save_file({"ids": gen.contiguous()}, str(path))
    return gen


def run_distill(ctx, cfg: DistillConfig, progress: bool = True, param_groups=None, on_step=None):
    """Run ``cfg`` in a recipe context; returns (student, TrainResult, trainer).
    ``param_groups`` / ``on_step``: see :class:`Distiller` and :meth:`Distiller.train`."""
    from compactor.io import home

    teacher, teacher_id = _teacher(ctx, cfg)
    streamed = cfg.teacher_stream
    student = _student(ctx, cfg, teacher.model if streamed else teacher)
    n_before = sum(r.get("step") == cfg.name for r in ctx.reports)  # one workdir per training step
    workdir = ctx.work_dir / f"{cfg.name}-{ctx.stage}-{n_before}"
    ids = train_windows(ctx, cfg, teacher, workdir, progress)
    autocast = use_bf16(cfg.precision)
    # In memory: one pass over the teacher's weights; streamed: a sample of its files.
    t_digest = teacher.store.input.digest() if streamed else state_digest(teacher)
    if cfg.signal == "cache":
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else home() / "teacher-cache" / (
            f"{t_digest}-{windows_digest(ids)}-k{cfg.top_k}")
        signal = TopKCache(cache_dir, ids, cfg.top_k, f"weights@{t_digest}")
        signal.build(teacher, cfg.micro_batch, autocast, progress)
    else:
        signal = LiveTeacher(teacher, autocast)
    # Per domain for several specs ("domains", or a comma list), as every evaluation is.
    eval_win = domain_windows(ctx.loaded.tokenizer, cfg.eval_data, cfg.window, max_tokens=cfg.eval_tokens)
    eval_win = next(iter(eval_win.values())) if len(eval_win) == 1 else eval_win
    reference = None
    if streamed:
        # The evaluation's teacher logits: one layer-wise pass, cached on disk.
        from compactor.evaluate.backends import CachedBackend
        from compactor.evaluate.streamed import StreamedBackend

        reference = CachedBackend(StreamedBackend(teacher, "teacher"), half=True,
                                  directory=workdir / "teacher-logits")
    trainer = Distiller(student, signal, cfg, ids, workdir, teacher_model=None if streamed else teacher,
                        eval_windows=eval_win, progress=progress,
                        identity={"teacher": f"{teacher_id}@{t_digest}"}, param_groups=param_groups,
                        reference=reference)
    result = trainer.train(resume=ctx.resume, on_step=on_step)
    return student, result, trainer


@register(DistillConfig, kind="model")
def _distill(ctx, cfg: DistillConfig) -> None:
    student, res, trainer = run_distill(ctx, cfg)
    ctx.loaded.model = student.model.eval()
    ctx.layer_origin = None
    first = res.evals[0] if res.evals and res.resumed_from is None else None
    ctx.reports.append({
        "step": cfg.name, "student": student.description, "layer_map": student.layer_map,
        "params": sum(p.numel() for p in student.model.parameters()),
        "steps": res.steps, "tokens": res.tokens, "train_seconds": round(res.seconds, 1),
        "train_tok_s": round(res.tokens_per_s, 1), "resumed_from": res.resumed_from,
        "before": first, "after": res.evals[-1] if res.evals else None, "final_terms": res.final, "evals": res.evals,
        "precision": "bf16" if trainer.autocast else "fp32", "processes": trainer.world,
    })
