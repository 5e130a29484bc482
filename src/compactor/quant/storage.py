"""Save and restore quantized models.

An output directory stays a normal transformers checkpoint (``model.safetensors`` holds the
dequantized weights, so plain transformers loads it) and adds the integer codes and grid
parameters of every quantized linear in ``quantization.safetensors``, described by
``quantization.json``. compactor restores :class:`QuantizedLinear` modules from them, and
exporters pack those codes without re-rounding. Activation quantization (W8A8) is recorded
per module in ``activations.json`` (mode, bits, calibrated scale) and re-applied on load.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

from compactor.errors import CompactorError
from compactor.primitives.qparams import QParams
from compactor.quant.activations import ActQuantLinear
from compactor.quant.qlinear import QuantizedEmbedding, QuantizedLinear, tie_head

MANIFEST = "quantization.json"
TENSORS = "quantization.safetensors"
ACTIVATIONS = "activations.json"
CODES_INDEX = "quantization.safetensors.index.json"


def quantized_modules(model, linear_only: bool = False) -> dict[str, QuantizedLinear]:
    """Every module stored as codes (linears and a quantized embedding), by name; a linear
    wrapped for activation quantization is named by its wrapper's (architecture) name."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, ActQuantLinear) and isinstance(m.inner, QuantizedLinear):
            out[n] = m.inner
        elif isinstance(m, QuantizedLinear) and not n.endswith(".inner"):
            if not (linear_only and isinstance(m, QuantizedEmbedding)):
                out[n] = m
    return out


@contextlib.contextmanager
def dequantized_view(model) -> Iterator[None]:
    """Temporarily swap quantized modules (and activation wrappers) for plain Linear /
    Embedding ones, so that the model is its architecture's own (for save_pretrained)."""
    swapped = {n: m for n, m in model.named_modules()
               if isinstance(m, ActQuantLinear) or (isinstance(m, QuantizedLinear) and not n.endswith(".inner"))}
    for n, m in swapped.items():
        inner = m.inner if isinstance(m, ActQuantLinear) else m
        model.set_submodule(n, inner.to_linear() if isinstance(inner, QuantizedLinear) else inner)
    try:
        yield
    finally:
        for n, m in swapped.items():
            model.set_submodule(n, m)


def _quant_tensors(n: str, m: QuantizedLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors of one quantized module and its manifest entry."""
    qp = m.qparams
    tensors = {f"{n}.codes": m.codes, f"{n}.scale": qp.scale}
    if qp.offset is not None:
        tensors[f"{n}.offset"] = qp.offset
    if qp.codebook is not None:
        tensors[f"{n}.codebook"] = qp.codebook
    extra = [k for k, v in qp.extra.items() if isinstance(v, torch.Tensor)]
    for k in extra:
        tensors[f"{n}.extra.{k}"] = qp.extra[k]
    entry = {"kind": "embedding" if isinstance(m, QuantizedEmbedding) else "linear",
             "grid": m.label, "bits_per_weight": m.bits_per_weight, "block": qp.block,
             "qmin": qp.qmin, "qmax": qp.qmax, "extra": extra,
             "shape": [m.out_features, m.in_features]}
    return tensors, entry


class ModelWriter:
    """Writes a model part by part (each decoder layer, then the rest) as a transformers
    checkpoint: dequantized weights in ``model-*.safetensors`` shards (plain transformers
    loads them) and the codes of every quantized module in ``quantization-*.safetensors``
    shards described by ``quantization.json``; W8A8 activation settings in
    ``activations.json``.

    ``weight_dtype(name)``: the dtype a quantized module's dequantized weight is written in
    (it only serves plain transformers; compactor restores from the codes), e.g. the input
    checkpoint's bf16. Every other tensor is written as it is in memory."""

    def __init__(self, directory: Path, weight_dtype=None, max_shard_bytes: int | None = None):
        from compactor.models.checkpoint import SHARD_BYTES, ShardWriter

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        size = max_shard_bytes or SHARD_BYTES
        self.weights = ShardWriter(self.directory, "model", size)
        self.codes = ShardWriter(self.directory, "quantization", size)
        self.manifest: dict[str, dict] = {}
        self.acts: dict[str, dict] = {}
        self.weight_dtype = weight_dtype or (lambda name: None)

    def add(self, module, prefix: str = "", skip: tuple[str, ...] = (), cast=None) -> None:
        """Every tensor of ``module`` (named ``prefix`` + its own names), except names that
        start with one of ``skip``; a tensor shared with one already written (a tied head)
        is written once. ``cast(name)``: the dtype to write an unquantized tensor in (None:
        as it is in memory) — a streamed model's untouched embedding and head keep their
        checkpoint dtype instead of the float32 they were materialized in."""
        qmods = {n: m for n, m in quantized_modules(module).items() if not (prefix + n).startswith(skip)}
        for n, m in qmods.items():
            full = prefix + n
            tensors, entry = _quant_tensors(full, m)
            for k, t in tensors.items():
                self.codes.add(k, t)
            self.manifest[full] = entry
        for n, m in module.named_modules():
            if isinstance(m, ActQuantLinear) and not (prefix + n).startswith(skip):
                self.acts[prefix + n] = {"mode": m.mode, "bits": m.bits, "scale": float(m.act_scale)}
        # Shared tensors (a tied head) are written once. Only within one call: a streamed
        # layer's memory is freed after it is written, and a later tensor may reuse the address.
        seen: set[int] = set()
        with dequantized_view(module):
            state = module.state_dict(keep_vars=True)
            for n, t in state.items():
                full = prefix + n
                if full.startswith(skip) or t.data_ptr() in seen and t.device.type != "meta":
                    continue
                owner = n.rsplit(".", 1)[0]
                if owner in qmods and n.endswith(".weight"):
                    dt = self.weight_dtype(full)
                    t = t.to(dt) if dt is not None else t
                else:
                    seen.add(t.data_ptr())
                    dt = cast(full) if cast is not None else None
                    t = t.to(dt) if dt is not None and t.is_floating_point() else t
                self.weights.add(full, t.detach())

    def checkpoint(self) -> dict:
        """Flush everything added so far and write a loadable partial checkpoint (index and
        manifest of what is written); returns the state :meth:`restore` continues from."""
        self.weights.close()
        self.codes.close()
        self._write_manifests()
        return {"weights": self.weights.state(), "codes": self.codes.state(),
                "manifest": self.manifest, "acts": self.acts}

    def restore(self, state: dict) -> None:
        self.weights.restore(state["weights"])
        self.codes.restore(state["codes"])
        self.manifest, self.acts = dict(state["manifest"]), dict(state["acts"])

    def _write_manifests(self) -> None:
        for n, entry in self.manifest.items():
            entry["file"] = self.codes.weight_map[f"{n}.codes"]
        if self.manifest:
            _write_json(self.directory / MANIFEST, self.manifest)
        if self.acts:
            _write_json(self.directory / ACTIVATIONS, self.acts)

    def close(self, config, tokenizer=None, generation_config=None) -> None:
        self.weights.close()
        codes_index = self.codes.close()
        config.save_pretrained(self.directory)
        if generation_config is not None:
            generation_config.save_pretrained(self.directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.directory)
        self._write_manifests()
        if not self.manifest:
            codes_index.unlink()


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _codes_index(directory: Path) -> dict[str, str]:
    """tensor -> shard of the codes index (``{}`` for older single-file outputs)."""
    index = Path(directory) / CODES_INDEX
    if not index.exists():
        return {}
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CompactorError(f"{index}: not a safetensors index ({exc})") from None


def _read_module_tensors(directory: Path, entry: dict, n: str, names: list[str],
                         where: dict[str, str] | None = None) -> dict:
    """The named tensors of one quantized module, each from the shard the codes index
    (``quantization.safetensors.index.json``) puts it in — a module's tensors may straddle a
    shard boundary — or from the entry's single file in older outputs."""
    from safetensors import safe_open

    where = _codes_index(directory) if where is None else where
    default = entry.get("file", TENSORS)
    by_file: dict[str, list[str]] = {}
    for k in names:
        by_file.setdefault(where.get(k, default), []).append(k)
    out = {}
    for file, members in by_file.items():
        path = Path(directory) / file
        try:
            with safe_open(str(path), framework="pt") as f:
                have = set(f.keys())
                out.update({k: f.get_tensor(k).clone() for k in members if k in have})
        except (OSError, ValueError, RuntimeError) as exc:
            raise CompactorError(f"{path} is unreadable (module {n}): {exc}") from None
    return out


def read_manifest(directory: Path) -> dict:
    """``quantization.json`` of ``directory`` ({} when it holds no quantized modules)."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise CompactorError(f"{path}: not valid JSON ({exc})") from None


def restore_quantization(model, directory: Path, lm_head: str = "lm_head", prefix: str | None = None) -> int:
    """Replace the modules listed in ``quantization.json`` by their quantized forms (a
    quantized embedding is re-shared with a tied head at ``lm_head``). With ``prefix``
    (``"model.layers.3."``), only the modules under it, and ``model`` is the module the
    prefix names. Returns how many were restored (0 if the directory holds no quantization).

    Tensors are read module by module, so a streamed layer reads only its own codes."""
    path = Path(directory) / MANIFEST
    manifest = read_manifest(directory)
    where = _codes_index(directory) if manifest else {}  # read once for all modules
    restored = 0
    for full, info in manifest.items():
        if prefix is not None and not full.startswith(prefix):
            continue
        n = full[len(prefix):] if prefix else full
        try:
            extra = list(info["extra"])
            names = [f"{full}.{k}" for k in ("codes", "scale", "offset", "codebook")] + \
                [f"{full}.extra.{k}" for k in extra]
            t = _read_module_tensors(directory, info, full, names, where)
            lin = model.get_submodule(n)
            qp = QParams(t[f"{full}.scale"], t.get(f"{full}.offset"), info["block"], info["qmin"],
                         info["qmax"], t.get(f"{full}.codebook"),
                         {k: t[f"{full}.extra.{k}"] for k in extra})
            codes = t[f"{full}.codes"]
        except (AttributeError, KeyError, TypeError) as exc:
            raise CompactorError(f"{path}: module {full}: missing {exc}") from None
        if list(codes.shape) != info["shape"]:
            raise CompactorError(f"{directory}: {full}.codes has shape {list(codes.shape)}, "
                                 f"manifest says {info['shape']}")
        if info.get("kind") == "embedding":
            model.set_submodule(n, QuantizedEmbedding(codes, qp, info["grid"], info["bits_per_weight"]))
            tie_head(model, n, lm_head)
        else:
            model.set_submodule(n, QuantizedLinear(codes, qp, info["grid"], info["bits_per_weight"],
                                                   getattr(lin, "bias", None), torch.float32))
        restored += 1
    acts_path = Path(directory) / ACTIVATIONS
    for full, a in (json.loads(acts_path.read_text()) if acts_path.exists() else {}).items():
        if prefix is not None and not full.startswith(prefix):
            continue
        n = full[len(prefix):] if prefix else full
        try:
            inner = model.get_submodule(n)
        except AttributeError:
            raise CompactorError(f"{acts_path}: module {full} is not in the model") from None
        model.set_submodule(n, ActQuantLinear(inner, a["mode"], a["bits"], torch.tensor(a["scale"])))
    return restored


def save_model(model, tokenizer, directory: Path, store=None, adapter=None,
               weight_dtype=None) -> None:
    """Write ``model`` to ``directory`` layer by layer through :class:`ModelWriter`, taking
    each decoder layer from ``store`` (in memory by default, or streamed from disk), then
    the embedding, final norm and head; config, generation config and tokenizer beside."""
    from compactor.models.adapters import adapter_for, decoder_layers
    from compactor.models.stream import ResidentWeights

    from compactor.distill.lora import adapter_tensors, detached_adapters

    with detached_adapters(model) as lora:  # the base as a base file; adapters beside it
        _save_base(model, tokenizer, directory, store, adapter, weight_dtype)
    if lora:
        from safetensors.torch import save_file

        tensors, manifest = adapter_tensors(lora)
        save_file(tensors, str(Path(directory) / "adapter.safetensors"))
        (Path(directory) / "adapter.json").write_text(json.dumps(manifest, indent=1))


def _save_base(model, tokenizer, directory: Path, store, adapter, weight_dtype) -> None:
    from compactor.models.adapters import adapter_for, decoder_layers
    from compactor.models.stream import ResidentWeights

    adapter = adapter or adapter_for(model)
    store = store or ResidentWeights()
    writer = ModelWriter(directory, weight_dtype)
    layers = f"{adapter.layers}."
    for i in range(len(decoder_layers(model, adapter))):
        writer.add(store.layer(model, i, adapter), prefix=f"{layers}{i}.")
        store.done(model, i, adapter)
    outer = [adapter.embed, adapter.final_norm, adapter.lm_head]
    with store.parts(model, outer, adapter):
        tied = getattr(model.config, "tie_word_embeddings", False)
        # Steps never change these parts of a streamed model: they keep the input's dtype.
        writer.add(model, skip=(layers,) + ((f"{adapter.lm_head}.",) if tied else ()),
                   cast=weight_dtype if store.streamed else None)
    # Every parameter must have landed (a writer that skipped one would leave transformers
    # to initialise it at random on load).
    written = set(writer.weights.weight_map) | set(writer.weights.pending)
    head = f"{adapter.lm_head}.weight"
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False)
               if n not in written and not (tied and n == head)]
    if missing:
        raise CompactorError(f"internal error: {len(missing)} tensors were not written (first: {missing[0]})")
    writer.close(model.config, tokenizer, getattr(model, "generation_config", None))
