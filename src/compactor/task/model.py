"""Task models: a transformers encoder with a mean-pooled classification head.

Why mean pooling, not the [CLS] vector: all-MiniLM-L6-v2 was trained as a sentence encoder
with mean pooling over real tokens (its ``1_Pooling/config.json``), and its pooler weights
were never trained for that objective; mean pooling starts the head from features that are
already sentence-level. A saved task model is an ordinary transformers encoder directory
(``AutoModel`` loads it unchanged) plus ``head.safetensors`` and ``task.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactor.errors import CompactorError
from compactor.models.adapters import EncoderAdapter, encoder_adapter_for_model_type, get_submodule

TASK_FILE, HEAD_FILE = "task.json", "head.safetensors"


@dataclass
class TaskOutput:
    """Logits ``[B, labels]``; with ``hidden``/``attentions`` the encoder's per-layer states
    (embeddings first) ``[B, T, d]`` and attention maps ``[B, H, T, T]``."""

    logits: torch.Tensor
    hidden: tuple | None = None
    attentions: tuple | None = None
    pooled: torch.Tensor | None = None


class TaskModel(nn.Module):
    """``encoder`` (a transformers base model) + masked mean pooling + dropout + linear head."""

    def __init__(self, encoder, labels: tuple[str, ...], dropout: float = 0.1, head: nn.Linear | None = None):
        super().__init__()
        self.encoder = encoder
        self.labels = tuple(labels)
        self.dropout = nn.Dropout(dropout)
        if head is None and self.labels:
            head = nn.Linear(encoder.config.hidden_size, len(self.labels))
        self.head = head  # None: a bare encoder (no task yet)

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False,
                attentions: bool = False) -> TaskOutput:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=hidden, output_attentions=attentions)
        h = out.last_hidden_state                                   # [B, T, d]
        m = attention_mask.unsqueeze(-1).to(h.dtype)                # [B, T, 1]: 1 on real tokens
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)           # [B, d]
        if self.head is None:
            raise CompactorError("this encoder has no classification head (fine-tune it on labeled data first)")
        return TaskOutput(self.head(self.dropout(pooled)), out.hidden_states if hidden else None,
                          out.attentions if attentions else None, pooled)


class LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the graph the ONNX exporter traces."""

    def __init__(self, model: TaskModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask).logits


@dataclass
class LoadedTask:
    """A task model (or a bare encoder: ``model.labels`` empty) with its tokenizer."""

    model: TaskModel
    tokenizer: Any
    adapter: EncoderAdapter
    source: str
    path: Path
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def has_head(self) -> bool:
        return bool(self.model.labels)


def resolve_encoder(source: str) -> Path:
    """A bundled encoder alias or a local encoder directory -> its directory."""
    from compactor.models.bundled import BUNDLED, BUNDLED_ENCODERS, bundled_encoder_dir

    if source in BUNDLED_ENCODERS:
        return bundled_encoder_dir(source)
    if source in BUNDLED:
        raise CompactorError(f"{source} is a causal LM, given where an encoder is expected "
                             f"(bundled encoders: {', '.join(BUNDLED_ENCODERS)})")
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise CompactorError(f"encoder not found: {source} (a bundled alias: {', '.join(BUNDLED_ENCODERS)}, "
                             "or a directory with config.json)")
    return path


def load_task(source: str, labels: tuple[str, ...] | None = None) -> LoadedTask:
    """Load an encoder directory (or alias). A saved task model brings its head and labels;
    a bare encoder gets a fresh head for ``labels`` (seeded by the caller), or none."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from compactor.models.load import LOCAL

    path = resolve_encoder(source)
    t0 = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(str(path), **LOCAL)
    except (ValueError, OSError) as exc:
        raise CompactorError(f"{path}/config.json is not a usable model config: {exc}") from None
    adapter = encoder_adapter_for_model_type(config.model_type, str(path))
    task_file = path / TASK_FILE
    meta = json.loads(task_file.read_text()) if task_file.exists() else {}
    try:
        if meta.get("heads"):  # per-layer head counts of a head-pruned model
            encoder = _load_pruned(path, config, adapter, meta["heads"])
        else:
            encoder = AutoModel.from_pretrained(str(path), dtype=torch.float32,
                                                add_pooling_layer=_has_pooler(path, adapter), **LOCAL)
        tokenizer = AutoTokenizer.from_pretrained(str(path), **LOCAL)
    except CompactorError:
        raise
    except Exception as exc:  # transformers raises assorted types on damaged files
        raise CompactorError(f"could not load the encoder in {path}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    setattr(encoder, adapter.pooler, None)  # mean pooling: a pooler is dead weight
    if meta:
        saved = tuple(meta["labels"])
        if labels is not None and tuple(labels) != saved:
            raise CompactorError(f"{path}: the model's labels are {', '.join(saved)}, the data's "
                                 f"{', '.join(labels)}")
        model = TaskModel(encoder, saved, dropout=meta.get("dropout", 0.1))
        model.head.load_state_dict(_read_head(path))
    else:
        model = TaskModel(encoder, tuple(labels or ()))
    model.eval()
    return LoadedTask(model, tokenizer, adapter, source, path, time.perf_counter() - t0)


def _load_pruned(path: Path, config, adapter: EncoderAdapter, counts: list[int]):
    """Build the encoder with the saved per-layer head counts, then read its weights strictly."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from compactor.models.checkpoint import CheckpointIndex
    from compactor.task.heads import shrink_to_counts

    encoder = AutoModel.from_config(config, add_pooling_layer=_has_pooler(path, adapter))
    shrink_to_counts(TaskModel(encoder, ("_",)), adapter, counts)
    state = {}
    for shard in sorted(set(CheckpointIndex(path).where.values())):
        state.update(load_file(str(path / shard)))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CompactorError(f"{path}: weights do not match the pruned shapes (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return encoder


def _has_pooler(path: Path, adapter: EncoderAdapter) -> bool:
    """Whether the checkpoint holds pooler weights (so loading neither drops nor invents any)."""
    from compactor.models.checkpoint import CheckpointIndex

    names = CheckpointIndex(path).where  # also checks every shard header strictly
    return any(n.split(".")[0] == adapter.pooler or f".{adapter.pooler}." in f".{n}" for n in names)


def load_task_meta(path: Path) -> tuple[Any, tuple[str, ...]]:
    """(tokenizer, labels) of a task directory without loading the encoder (an ONNX export
    keeps only these beside its graph)."""
    from transformers import AutoTokenizer

    from compactor.models.load import LOCAL

    task_file = Path(path) / TASK_FILE
    if not task_file.exists():
        raise CompactorError(f"{path}: no {TASK_FILE} (not a task model or its export)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **LOCAL)
    except Exception as exc:
        raise CompactorError(f"could not load the tokenizer in {path}: {type(exc).__name__}") from None
    return tokenizer, tuple(json.loads(task_file.read_text())["labels"])


def _read_head(path: Path) -> dict:
    from safetensors.torch import load_file

    f = path / HEAD_FILE
    if not f.exists():
        raise CompactorError(f"{path}: {TASK_FILE} is present but {HEAD_FILE} is missing")
    sd = load_file(str(f))
    if set(sd) != {"weight", "bias"}:
        raise CompactorError(f"{f}: expected tensors weight and bias, found {', '.join(sorted(sd))}")
    return sd


def save_task(model: TaskModel, tokenizer, out: Path, extra: dict | None = None, weights: bool = True) -> None:
    """Write ``model`` into the (temporary) directory ``out``: encoder + tokenizer as a
    transformers directory, the head and ``task.json`` beside them. ``weights=False`` writes
    the encoder's config instead of its weights (an ONNX export, whose graph carries them)."""
    from safetensors.torch import save_file

    if not model.labels:
        raise CompactorError("a model without a classification head cannot be saved as a task model")
    if weights:
        model.encoder.save_pretrained(str(out))
    else:
        model.encoder.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(out / HEAD_FILE))
    from compactor.task.heads import head_counts

    meta = {"task": "classify", "labels": list(model.labels), "pooling": "mean",
            "dropout": model.dropout.p, **(extra or {})}
    counts = head_counts(model, encoder_adapter_for_model_type(model.config.model_type))
    if len(set(counts)) > 1 or counts[0] != getattr(model.config, "num_attention_heads", counts[0]):
        meta["heads"] = counts  # per layer: plain transformers cannot load this model
    (out / TASK_FILE).write_text(json.dumps(meta, indent=1))


def encoder_layers(model: TaskModel, adapter: EncoderAdapter) -> nn.ModuleList:
    """The encoder's ``nn.ModuleList`` of layers."""
    return get_submodule(model.encoder, adapter.layers)


def parameter_count(model: TaskModel) -> int:
    return sum(p.numel() for p in model.parameters())


def is_task_dir(path: str | Path) -> bool:
    """Whether ``path`` holds an encoder (a task model or a bare one), not a causal LM."""
    from compactor.models.adapters import is_encoder_type

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return is_encoder_type(json.loads(cfg.read_text()).get("model_type", ""))
    except json.JSONDecodeError:
        return False
