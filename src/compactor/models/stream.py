"""Where a model's weights live while compactor works on it: in memory, or streamed.

Every walker asks a weight store for decoder layer ``i`` (:meth:`layer`), works on it, and
hands it back (:meth:`done`); the embedding, final norm and head are materialized for the
duration of a ``with store.parts(model, [...])`` block. :class:`ResidentWeights` is the
in-memory model (every call is a no-op), :class:`StreamedWeights` keeps a skeleton on the
meta device and reads each layer from the checkpoint's safetensors shards in float32 when
asked, releasing it again afterwards — so the same walker serves both, and peak memory of
a streamed run is one layer plus the activations, whatever the depth.

A streamed layer that a step changed is written to that step's working checkpoint
(:meth:`StreamedWeights.done` with ``changed=True``) and read from there afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from compactor.errors import CompactorError
from compactor.models.adapters import Adapter, decoder_layers
from compactor.models.checkpoint import CheckpointIndex


def release_freed_memory() -> None:
    """Hand memory freed by a finished layer back to the OS (glibc keeps freed chunks of
    replaced weights and activations in its heap otherwise, and peak RSS creeps up)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class ResidentWeights:
    """The whole model is in memory; layers are the model's own modules."""

    streamed = False

    def layer(self, model, i: int, adapter: Adapter) -> nn.Module:
        return decoder_layers(model, adapter)[i]

    def done(self, model, i: int, adapter: Adapter, changed: bool = False) -> None:
        """Nothing to release: the layer stays in the model."""

    @contextlib.contextmanager
    def parts(self, model, names: list[str], adapter: Adapter) -> Iterator[None]:
        yield


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor, is_param: bool) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if is_param:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _to_meta(module: nn.Module) -> None:
    """Release every tensor of ``module`` (parameters and buffers) back to the meta device."""
    for sub in module.modules():
        for k, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for k, b in list(sub._buffers.items()):
            if b is not None and b.device.type != "meta" and k in sub._non_persistent_buffers_set:
                continue  # e.g. RoPE's inv_freq: computed at construction, never in a checkpoint
            if b is not None and b.device.type != "meta":
                sub._buffers[k] = torch.empty_like(b, device="meta")


def _meta_names(module: nn.Module) -> list[tuple[str, bool]]:
    """(name, is_parameter) of every tensor of ``module`` still on the meta device."""
    out = [(n, True) for n, p in module.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    out += [(n, False) for n, b in module.named_buffers(remove_duplicate=False) if b.device.type == "meta"]
    return out


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class StreamedWeights:
    """A meta-device skeleton whose tensors are read from safetensors shards on demand.

    ``directory``: the checkpoint (index or single file) the model was loaded from; layers
    changed by a step are read from that step's checkpoint afterwards (:meth:`moved`).
    Quantized modules recorded in a checkpoint's ``quantization.json`` are restored from
    their codes."""

    streamed = True

    def __init__(self, model, adapter: Adapter, directory: str | Path):
        self.adapter = adapter
        self.input = CheckpointIndex(directory)
        layers = decoder_layers(model, adapter)
        self.meta = list(layers)  # the skeleton of every layer, kept to release into
        self.source: list[Path] = [Path(directory)] * len(layers)
        self._indexes: dict[Path, CheckpointIndex] = {Path(directory): self.input}
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        #: name -> loader of a tensor that replaces the checkpoint's when materialized (the
        #: values an exporter rounded, read back from its file while it is verified)
        self.overrides: dict[str, object] = {}
        self._check_complete(model)

    def _check_complete(self, model) -> None:
        """Every tensor of the skeleton must be in the checkpoint (named if not) before any
        work starts; a tied head shares the embedding's."""
        head = f"{self.adapter.lm_head}.weight"
        for name, _ in _meta_names(model):
            if name == head and self.tied:
                continue
            if name not in self.input:
                raise CompactorError(f"{self.input.index_file}: tensor {name!r} of the model is not in "
                                     "the checkpoint")

    def input_dtype(self, name: str) -> torch.dtype | None:
        """The dtype ``name`` has in the input checkpoint (None if it is not there)."""
        if name not in self.input:
            return None
        return _ST_DTYPES.get(self.input.info(name)["dtype"])

    def index(self, directory: Path) -> CheckpointIndex:
        if directory not in self._indexes:
            self._indexes[directory] = CheckpointIndex(directory)
        return self._indexes[directory]

    def layer(self, model, i: int, adapter: Adapter) -> nn.Module:
        """Layer ``i`` materialized in float32 (quantized modules restored from codes)."""
        from compactor.quant.storage import read_manifest, restore_quantization

        layers = decoder_layers(model, adapter)
        if layers[i] is not self.meta[i]:
            return layers[i]  # already materialized (e.g. by an enclosing walker)
        prefix = f"{adapter.layers}.{i}."
        src = self.source[i]
        layer = copy.deepcopy(self.meta[i])
        # Quantized modules come back from their codes: their dequantized weights (written
        # for plain transformers) are not read.
        coded = {n[len(prefix):] for n in read_manifest(src) if n.startswith(prefix)}
        names = [(n, p) for n, p in _meta_names(layer)
                 if not (n.endswith(".weight") and n[: -len(".weight")] in coded)]
        tensors = self.index(src).read([prefix + n for n, _ in names], dtype=torch.float32)
        for n, is_param in names:
            t = self.overrides[prefix + n]() if prefix + n in self.overrides else tensors[prefix + n]
            _set_tensor(layer, n, t, is_param)
        restore_quantization(layer, src, adapter.lm_head, prefix=prefix)
        layers[i] = layer
        return layer

    def done(self, model, i: int, adapter: Adapter, changed: bool = False) -> None:
        """Release layer ``i`` (it must have been written first if ``changed``)."""
        decoder_layers(model, adapter)[i] = self.meta[i]
        release_freed_memory()

    def moved(self, i: int, directory: Path) -> None:
        """Layer ``i`` is read from ``directory`` from now on (its index is read afresh: the
        directory may have grown since it was last read)."""
        self.source[i] = Path(directory)
        self._indexes.pop(Path(directory), None)

    @contextlib.contextmanager
    def parts(self, model, names: list[str], adapter: Adapter) -> Iterator[None]:
        """Materialize the named modules outside the decoder layers (embedding, final norm,
        head) for the block, in float32; a tied head shares the embedding's table."""
        done: list[nn.Module] = []
        head, embed = adapter.lm_head, adapter.embed
        for part in names:
            mod = model.get_submodule(part)
            todo = [(n, p) for n, p in _meta_names(mod)]
            if not todo:
                continue
            full = {n: (f"{part}.{n}" if not (part == head and self.tied) else f"{embed}.{n}") for n, _ in todo}
            tensors = self.input.read(full.values(), dtype=torch.float32)
            for n, is_param in todo:
                own = f"{part}.{n}"
                t = (self.overrides[own]() if own in self.overrides
                     else self.overrides[full[n]]() if full[n] in self.overrides else tensors[full[n]])
                _set_tensor(mod, n, t, is_param)
            done.append(mod)
        if self.tied and embed in names and head in names:
            model.get_submodule(head)._parameters["weight"] = model.get_submodule(embed).weight
        try:
            yield
        finally:
            for mod in done:
                _to_meta(mod)
            release_freed_memory()


def load_skeleton(directory: str | Path):
    """A transformers model of ``directory``'s config with every parameter on the meta
    device (buffers computed at construction, such as RoPE frequencies, stay real)."""
    from transformers import AutoConfig

    return skeleton_from_config(AutoConfig.from_pretrained(str(directory), local_files_only=True))


def skeleton_from_config(config):
    """The meta-device model of a transformers config (see :func:`load_skeleton`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
