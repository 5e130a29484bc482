"""Sharded safetensors checkpoints, read and written tensor by tensor.

:class:`CheckpointIndex` maps tensor names to shard files (``model.safetensors.index.json``
or a single ``model.safetensors``) and reads the tensors asked for. Each read opens the
shard, copies the tensors out and closes it again: a memory map held open keeps every page
it touched resident and counted in RSS (AutoRound reopens per read for the same reason).

:class:`ShardWriter` writes tensors in the order they are added into numbered shards of at
most ``max_shard_bytes`` and an index, so a model is written one layer at a time. The same
writer serves in-memory and streamed models, so both write the same bytes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from compactor.errors import CompactorError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Default shard size of written checkpoints (transformers' default is 5 GB): a writer holds
#: up to one shard of pending tensors, so smaller shards keep its memory small.
SHARD_BYTES = 512 * 1024**2
#: safetensors' dtype names
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
#: an integer dtype of each element size, to reach any tensor's raw bytes through numpy
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets), validated as
    strictly as the format is: every tensor's dtype known, shape non-negative integers, its
    byte range the size its shape and dtype say, the ranges tiling the data exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CompactorError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > min(size - 8, 100 * 1024**2):
            raise CompactorError(f"{path}: safetensors header length {n} does not fit the file ({size} bytes)")
        try:
            head = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CompactorError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(head, dict):
        raise CompactorError(f"{path}: safetensors header is not a JSON object")
    data = size - 8 - n
    spans = []
    for name, info in head.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise CompactorError(f"{path}: tensor {name!r} needs dtype, shape and two data_offsets") from None
        if not (isinstance(begin, int) and isinstance(end, int)) or isinstance(begin, bool):
            raise CompactorError(f"{path}: tensor {name!r} has non-integer data_offsets")
        if dtype not in _ITEMSIZE:
            raise CompactorError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CompactorError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not 0 <= begin <= end <= data:
            raise CompactorError(f"{path}: tensor {name!r} lies at bytes {begin}..{end}, past the "
                                 f"{data} bytes of data in the file")
        want = _ITEMSIZE[dtype]
        for d in shape:
            want *= d
        if end - begin != want:
            raise CompactorError(f"{path}: tensor {name!r} ({dtype} {shape}) needs {want} bytes, its "
                                 f"offsets give {end - begin}")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CompactorError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected "
                                 f"{at} (overlapping or a gap)")
        at = end
    if at != data:
        raise CompactorError(f"{path}: tensors cover {at} of the {data} bytes of data")
    return head


class CheckpointIndex:
    """Where every tensor of a transformers checkpoint directory lives."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CompactorError(f"{index}: not a safetensors index (needs 'weight_map'): {exc}") from None
            self.where = dict(weight_map)
            self.index_file = index
        elif (self.directory / SINGLE).exists():
            self.where = {k: SINGLE for k in _header(self.directory / SINGLE) if k != "__metadata__"}
            self.index_file = self.directory / SINGLE
        else:
            raise CompactorError(f"{self.directory} has no {SINGLE} or {INDEX} (only safetensors "
                                 "checkpoints can be streamed)")
        self.headers: dict[str, dict] = {}
        for shard in sorted(set(self.where.values())):
            path = self.directory / shard
            if not path.is_file():
                first = next(n for n, s in self.where.items() if s == shard)
                raise CompactorError(f"{self.index_file}: shard {shard} (holding {first!r}) is missing")
            self.headers[shard] = _header(path)
        for name, shard in self.where.items():
            if name not in self.headers[shard]:
                raise CompactorError(f"{self.index_file}: tensor {name!r} is listed in shard {shard}, "
                                     "which does not hold it")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> dict:
        """``{"dtype": "BF16", "shape": [...], "data_offsets": [...]}`` from the header."""
        self._check([name])
        return self.headers[self.where[name]][name]

    def nbytes(self, name: str) -> int:
        begin, end = self.info(name)["data_offsets"]
        return end - begin

    def _check(self, names) -> None:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise CompactorError(f"{self.index_file}: tensor {missing[0]!r} is not in the checkpoint"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def read(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (owned copies; floating ones cast to ``dtype`` when given)."""
        from safetensors import safe_open

        names = list(names)
        self._check(names)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_shard[self.where[n]].append(n)
        out = {}
        for shard, members in by_shard.items():
            with safe_open(str(self.directory / shard), framework="pt") as f:
                for n in members:
                    t = f.get_tensor(n)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    else:
                        t = t.clone()  # never a view of the (soon closed) mapping
                    out[n] = t
        return out


    def digest(self, sample: int = 4096) -> str:
        """Fingerprint of the checkpoint without reading it whole: every tensor's name, dtype
        and shape and the first ``sample`` bytes of its data (plain reads, not a mapping), so
        a teacher bigger than memory gets a cache key in seconds."""
        import hashlib

        h = hashlib.sha256()
        for shard in sorted(self.headers):
            path = self.directory / shard
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
                for name in sorted(self.headers[shard]):
                    info = self.headers[shard][name]
                    if name == "__metadata__":
                        continue
                    begin, end = info["data_offsets"]
                    f.seek(start + begin)
                    h.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
                    h.update(f.read(min(sample, end - begin)))
        return h.hexdigest()[:16]


class ShardWriter:
    """Writes tensors into ``model-00001.safetensors``, ... of at most ``max_shard_bytes``,
    in the order added, and an index on :meth:`close`.

    Why spools: a tensor's bytes go to disk when it is added (one spool file per element
    size), and a shard is assembled from the spools when it fills — so memory never holds a
    pending shard (up to 512 MiB, and twice that while ``safetensors.save_file`` serializes
    it). The shard is a standard safetensors file: header, then the tensors by element size,
    largest first (as ``save_file`` orders them, so every tensor stays aligned)."""

    def __init__(self, directory: str | Path, prefix: str = "model", max_shard_bytes: int = SHARD_BYTES):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        #: name -> (safetensors dtype, shape, element size, byte offset in its spool, nbytes)
        self.pending: dict[str, tuple] = {}
        self.pending_bytes = 0
        self._spools: dict[int, object] = {}
        self.weight_map: dict[str, str] = {}
        self.shards = 0
        self.total_bytes = 0

    def _spool(self, item: int):
        if item not in self._spools:
            self._spools[item] = open(self.directory / f".{self.prefix}-spool-{item}.tmp", "w+b")
        return self._spools[item]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            # A writer must never receive an unmaterialized tensor (it would write garbage).
            raise CompactorError(f"internal error: tensor {name} is on the meta device at write time")
        if name in self.weight_map or name in self.pending:
            raise CompactorError(f"internal error: tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        t = tensor.detach().contiguous()
        item = t.element_size()
        f = self._spool(item)
        offset = f.tell()
        # The raw bytes, through a same-size integer view (numpy has no bfloat16).
        raw = t.reshape(-1).view(_INT_OF_SIZE[item]) if t.numel() else t.reshape(-1)
        f.write(memoryview(raw.numpy()).cast("B") if t.numel() else b"")
        self.pending[name] = (_ST_NAMES[t.dtype], list(t.shape), item, offset, nbytes)
        self.pending_bytes += nbytes

    def flush(self) -> None:
        import shutil

        if not self.pending:
            return
        self.shards += 1
        shard = f"{self.prefix}-{self.shards:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        base: dict[int, int] = {}
        pos = 0
        for item in sorted({e[2] for e in self.pending.values()}, reverse=True):
            base[item] = pos
            pos += self._spool(item).tell()
        for name, (dtype, shape, item, offset, nbytes) in self.pending.items():
            begin = base[item] + offset
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as save_file pads it
        path = self.directory / shard
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for item in sorted(base, reverse=True):
                f = self._spools[item]
                f.seek(0)
                shutil.copyfileobj(f, out, 16 << 20)
                f.seek(0)
                f.truncate()
        tmp.replace(path)
        for n in self.pending:
            self.weight_map[n] = shard
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def _drop_spools(self) -> None:
        for item, f in self._spools.items():
            f.close()
            (self.directory / f".{self.prefix}-spool-{item}.tmp").unlink(missing_ok=True)
        self._spools = {}

    def close(self) -> Path:
        """Flush and write ``<prefix>.safetensors.index.json`` (atomically); its path."""
        self.flush()
        self._drop_spools()
        index = self.directory / f"{self.prefix}.safetensors.index.json"
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": self.total_bytes},
                                   "weight_map": self.weight_map}, indent=1))
        tmp.replace(index)
        return index

    def state(self) -> dict:
        """What :meth:`restore` needs to continue writing after a crash (call after a flush)."""
        return {"weight_map": dict(self.weight_map), "shards": self.shards, "total_bytes": self.total_bytes}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`; shards written after it (by a killed run) are dropped."""
        self.weight_map = dict(state["weight_map"])
        self.shards, self.total_bytes = state["shards"], state["total_bytes"]
        keep = set(self.weight_map.values())
        for f in self.directory.glob(f"{self.prefix}-*.safetensors"):
            if f.name not in keep:
                f.unlink()
