"""Build a distillation student from a spec string, and record which teacher layer each
student layer should imitate (for the hidden-state and attention losses).

Specs (``+`` chains them, applied left to right to a copy of the teacher)::

    same                          the teacher itself, copied (self-distillation from its weights)
    random                        the teacher's architecture, freshly initialised (born-again)
    layers:every-other            keep layers 0, 2, 4, ... (DistilBERT)
    layers:15[:block_influence]   drop 15 layers chosen by depth importance (or ``angular``)
    layers:0.5[:angular]          drop that fraction of the layers
    channels:0.25                 remove 25 % of every MLP's channels, by importance
    heads:0.33                    remove a third of the key/value head groups, by importance
    config:num_hidden_layers=6,intermediate_size=512    a smaller random model of the same family
    <path or alias>               any model with the teacher's tokenizer
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


from compactor.errors import CompactorError


@dataclass
class Student:
    """The student model and, per student layer, the teacher layer whose output it imitates."""

    model: object
    layer_map: list[int]
    description: list[str] = field(default_factory=list)


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student layer j imitates teacher layer ⌈(j+1)·Lt/Ls⌉−1 (the last maps to the last)."""
    return [-(-(j + 1) * n_teacher // n_student) - 1 for j in range(n_student)]


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_vocab(student, teacher, tokenizer_s=None, tokenizer_t=None) -> None:
    """Refuse a student that does not share the teacher's vocabulary (KD compares token
    distributions position by position)."""
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise CompactorError(f"vocabulary mismatch: the student has {vs} tokens, the teacher {vt}; "
                             "distillation needs the same tokenizer")
    if tokenizer_s is not None and tokenizer_t is not None and tokenizer_s.get_vocab() != tokenizer_t.get_vocab():
        raise CompactorError("vocabulary mismatch: student and teacher tokenizers map tokens to "
                             "different ids; distillation needs the same tokenizer")


def _parse_config_overrides(text: str, base) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, val = item.partition("=")
        if not sep or not hasattr(base, key.strip()):
            raise CompactorError(f"student spec config:{text}: {item!r} is not key=value with a key of "
                                 f"the teacher's {type(base).__name__}")
        old = getattr(base, key.strip())
        try:
            out[key.strip()] = type(old)(val) if old is not None else int(val)
        except ValueError:
            raise CompactorError(f"student spec config:{text}: {key}={val!r} is not a {type(old).__name__}") from None
    return out


def _fraction_or_count(arg: str, total: int, what: str) -> int:
    try:
        v = float(arg)
    except ValueError:
        raise CompactorError(f"student spec {what}:{arg}: expected a count or a fraction") from None
    n = int(round(v * total)) if 0 < v < 1 else int(v)
    if n != v and not 0 < v < 1:
        raise CompactorError(f"student spec {what}:{arg}: expected a whole count or a fraction in (0, 1)")
    return n


def build_student(teacher, spec: str, windows=None, adapter=None, tokenizer=None, progress: bool = True) -> Student:
    """Build the student described by ``spec`` from ``teacher`` (which is left untouched).

    ``windows``: calibration windows for importance-based cuts.
    """
    from compactor.models.adapters import adapter_for
    from compactor.prune.cuts import channels_kept, choose_layers, lowest_removed
    from compactor.prune.importance import unit_importance
    from compactor.prune.structured import drop_layers, prune_kv_groups, prune_mlp_channels

    adapter = adapter or adapter_for(teacher)
    n_teacher = teacher.config.num_hidden_layers
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise CompactorError("empty student spec")
    if len(parts) == 1 and not any(parts[0].startswith(k) for k in ("same", "random", "layers:", "channels:",
                                                                     "heads:", "config:")):
        return _external_student(teacher, parts[0], tokenizer)

    model = copy.deepcopy(teacher)
    layer_map = list(range(n_teacher))
    desc = []
    for part in parts:
        kind, _, arg = part.partition(":")
        if kind == "same":
            desc.append("copy of the teacher")
        elif kind in ("random", "config"):
            overrides = _parse_config_overrides(arg, model.config) if arg else {}
            cfg = copy.deepcopy(model.config)
            for k, v in overrides.items():
                setattr(cfg, k, v)
            if "num_hidden_layers" in overrides and isinstance(getattr(cfg, "layer_types", None), list):
                cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
            except (ValueError, TypeError) as exc:
                raise CompactorError(f"student spec {part}: not a valid config: {exc}") from None
            layer_map = uniform_layer_map(cfg.num_hidden_layers, n_teacher)
            desc.append(f"random init, {overrides or 'teacher architecture'}")
        elif kind == "layers":
            n = model.config.num_hidden_layers
            bits = arg.split(":")
            if bits[0] == "every-other":
                chosen = list(range(1, n, 2))
            else:
                count = _fraction_or_count(bits[0], n, "layers")
                if count >= n:
                    raise CompactorError(f"student spec {part}: removing {count} of {n} layers would leave none")
                metric = bits[1] if len(bits) > 1 else "block_influence"
                if metric not in ("block_influence", "angular"):
                    raise CompactorError(f"student spec {part}: metric must be block_influence or angular")
                if windows is None and count:
                    raise CompactorError(f"student spec {part} needs calibration windows to rank layers")
                chosen = choose_layers(model, windows, count, metric, adapter, progress=progress)
            if len(chosen) >= n:
                raise CompactorError(f"student spec {part}: removing {len(chosen)} of {n} layers would leave none")
            drop_layers(model, chosen, adapter)
            layer_map = [m for i, m in enumerate(layer_map) if i not in set(chosen)]
            desc.append(f"dropped layers {chosen} of {n}")
        elif kind in ("channels", "heads"):
            try:
                frac = float(arg)
            except ValueError:
                frac = -1.0
            if not 0 < frac < 1:
                raise CompactorError(f"student spec {part}: give a fraction in (0, 1)")
            if windows is None:
                raise CompactorError(f"student spec {part} needs calibration windows to rank units")
            imp = unit_importance(model, windows, adapter, progress=progress)
            if kind == "channels":
                width = model.config.intermediate_size
                keep = channels_kept(width, frac, 64 if width >= 128 else 1)
                prune_mlp_channels(model, lowest_removed(imp.channels, width - keep), adapter)
                desc.append(f"MLP width {width} -> {keep}")
            else:
                n_kv = getattr(model.config, adapter.kv_heads_key)
                n = int(round(frac * n_kv))
                if n >= n_kv or n == 0:
                    raise CompactorError(f"student spec {part}: removes {n} of {n_kv} key/value heads")
                prune_kv_groups(model, lowest_removed(imp.kv_groups, n), adapter)
                desc.append(f"key/value heads {n_kv} -> {n_kv - n}")
        else:
            raise CompactorError(f"unknown student spec part {part!r} (see compactor.distill.student)")
    if _n_params(model) > _n_params(teacher):
        raise CompactorError(f"student spec {spec!r} gives {_n_params(model):,} parameters, more than the "
                             f"teacher's {_n_params(teacher):,}: a student should be smaller")
    return Student(model.train(), layer_map, desc)


def _external_student(teacher, source: str, tokenizer=None) -> Student:
    from compactor.models.load import load_model

    loaded = load_model(source)
    check_vocab(loaded.model, teacher, loaded.tokenizer, tokenizer)
    n_s = loaded.model.config.num_hidden_layers
    return Student(loaded.model.train(), uniform_layer_map(n_s, teacher.config.num_hidden_layers),
                   [f"loaded from {source}"])
