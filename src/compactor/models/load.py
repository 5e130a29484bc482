"""Load a model from a built-in alias, a transformers directory or a GGUF file.

GGUF files are dequantized by transformers (through ``gguf``) once and cached as a float
safetensors checkpoint keyed by the file's sha256, so later loads take seconds.
"""

from __future__ import annotations

import json

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compactor.errors import CompactorError
from compactor.io import atomic_dir, home, sha256_file
from compactor.models.adapters import Adapter, adapter_for_gguf_arch, adapter_for_model_type
from compactor.models.bundled import BUNDLED, bundled_gguf

#: Every transformers load reads local files only: nothing is ever fetched from a hub (and
#: importing compactor sets no environment variable to get there).
LOCAL = {"local_files_only": True}


@dataclass
class LoadedModel:
    """A model with its tokenizer, family adapter and where it came from."""

    model: Any
    tokenizer: Any
    adapter: Adapter
    source: str
    path: Path | None = None  # the transformers directory actually read
    gguf: Path | None = None  # the GGUF file it came from, if any
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    #: where the weights live: in memory (ResidentWeights) or streamed from ``path``
    store: Any = None

    def __post_init__(self) -> None:
        if self.store is None:
            from compactor.models.stream import ResidentWeights

            self.store = ResidentWeights()

    @property
    def streamed(self) -> bool:
        return bool(self.store.streamed)


def read_gguf_header(path: Path) -> dict[str, Any]:
    """Validate a GGUF file and return a few header facts; specific errors for bad files."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors on damaged files
        raise CompactorError(
            f"{path} is not a readable GGUF file (truncated or corrupt: "
            f"{type(exc).__name__}: {exc})"
        ) from None
    field_ = reader.fields.get("general.architecture")
    if field_ is None:
        raise CompactorError(f"{path}: GGUF metadata has no general.architecture key")
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise CompactorError(f"{path} is truncated: tensor data ends at {end} bytes, file has "
                             f"{path.stat().st_size}")
    return {
        "architecture": str(field_.contents()),
        "tensors": len(reader.tensors),
        "types": sorted({t.tensor_type.name for t in reader.tensors}),
    }


def _gguf_to_checkpoint(path: Path, digest: str | None = None, adapter: Adapter | None = None) -> Path:
    """Convert a GGUF file to a cached float32 transformers directory (once per sha256),
    tensor by tensor (:mod:`compactor.models.gguf_convert`).

    ``digest``: the file's sha256 when already known (the bundled model was verified on
    download), so a load does not re-hash ~100 MB."""
    from compactor.models.gguf_convert import convert_gguf

    digest = digest or sha256_file(path)
    dest = home() / "converted" / digest[:20]
    if (dest / "config.json").exists():
        return dest
    if adapter is None:
        adapter = adapter_for_gguf_arch(read_gguf_header(path)["architecture"], str(path))
    logging.getLogger(__name__).info("converting %s to a float checkpoint (once)", path)
    with atomic_dir(dest, overwrite=True) as tmp:
        convert_gguf(path, tmp, adapter)
        (tmp / "SOURCE").write_text(f"{path.resolve()}\nsha256 {digest}\n")
    return dest


def resolve_source(source: str | os.PathLike) -> tuple[Path, Path | None, Adapter | None]:
    """Map a model source to (transformers directory, GGUF file or None, adapter or None)."""
    src = str(source)
    if src in BUNDLED:
        gguf_path = bundled_gguf(src)
        return _gguf_to_checkpoint(gguf_path, BUNDLED[src].sha256), gguf_path, None
    path = Path(src).expanduser()
    if not path.exists():
        raise CompactorError(
            f"model not found: {src} (give a built-in alias: {', '.join(BUNDLED)}; "
            "a transformers directory; or a .gguf file)"
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"; it holds {ggufs[0].name}: pass that file" if ggufs else ""
            raise CompactorError(f"directory {path} holds no transformers model (no config.json){hint}")
        return path, None, None
    header = read_gguf_header(path)
    adapter = adapter_for_gguf_arch(header["architecture"], str(path))
    return _gguf_to_checkpoint(path, adapter=adapter), path, adapter


def load_model(source: str | os.PathLike, dtype: torch.dtype = torch.float32,
               stream: bool = False) -> LoadedModel:
    """Load ``source`` (alias, transformers directory or GGUF file) as (model, tokenizer).

    The model is in eval mode. Its family must be in the adapter table. ``stream=True``
    builds the model on the meta device and reads each layer from the safetensors shards
    when a walker asks for it (:class:`compactor.models.stream.StreamedWeights`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, gguf_path, adapter = resolve_source(source)
    t0 = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(str(directory), **LOCAL)
    except (ValueError, OSError) as exc:
        raise CompactorError(f"{directory}/config.json is not a usable model config: {exc}") from None
    adapter = adapter or adapter_for_model_type(config.model_type, str(directory))
    if stream:
        return _load_streamed(source, directory, gguf_path, adapter, t0)
    from compactor.models.checkpoint import CheckpointIndex

    CheckpointIndex(directory)  # every shard's header checked strictly before transformers reads it
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **LOCAL)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **LOCAL)
    except Exception as exc:  # transformers/safetensors raise assorted types on damaged files
        raise CompactorError(f"could not load the model in {directory}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    # transformers maps the safetensors file into memory and the parameters point into the
    # mapping, which keeps every page a pass has touched resident for the model's lifetime,
    # even after a compression step replaced the module. Own copies are freed on replacement.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    from compactor.quant.storage import restore_quantization

    restored = restore_quantization(model, directory, adapter.lm_head)
    if (directory / "adapter.json").exists():  # LoRA adapters kept beside the base
        from safetensors.torch import load_file

        from compactor.distill.lora import attach_adapters

        attach_adapters(model, load_file(str(directory / "adapter.safetensors")),
                        json.loads((directory / "adapter.json").read_text()), str(directory))
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        source=str(source),
        path=directory,
        gguf=gguf_path,
        load_seconds=time.perf_counter() - t0,
        info={"quantized_modules": restored},
    )


def _load_streamed(source, directory: Path, gguf_path, adapter: Adapter, t0: float) -> LoadedModel:
    from transformers import AutoTokenizer

    from compactor.models.stream import StreamedWeights, load_skeleton

    model = load_skeleton(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **LOCAL)
    except OSError as exc:
        raise CompactorError(f"could not load the tokenizer in {directory}: {exc}") from None
    store = StreamedWeights(model, adapter, directory)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=str(source),
                       path=directory, gguf=gguf_path, load_seconds=time.perf_counter() - t0,
                       info={"streamed": True}, store=store)
