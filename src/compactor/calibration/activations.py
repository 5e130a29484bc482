"""The calibration activations between two decoder layers, in memory or spilled to disk.

The sequential runner keeps one hidden-state tensor per calibration batch (plus the layer's
keyword arguments: position embeddings, masks — small and shared), and per layer the cached
inputs of the replayed consumers (o_proj, down_proj: the down projection's input is the
widest tensor of a layer). With ``spill_dir`` each batch lives in a raw file instead and is
read back when the runner iterates, so memory holds one batch at a time. Files are read and
written with plain I/O, not memory maps: a mapping keeps every page it touched resident and
counted in RSS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

_NP = {torch.float32: np.float32, torch.float16: np.float16}


class Activations:
    """A list of ``(hidden [B, T, H], kwargs)`` per batch; spilled to ``spill_dir`` if given."""

    def __init__(self, spill_dir: str | Path | None = None):
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._items: list[tuple[object, dict]] = []

    def __len__(self) -> int:
        return len(self._items)

    def _put(self, i: int, hidden: torch.Tensor):
        if self.spill_dir is None:
            return hidden
        path = self.spill_dir / f"batch{i:05d}.bin"
        t = hidden.detach().contiguous()
        # bf16 has no numpy dtype: its bits travel as int16.
        arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        tmp = path.with_suffix(".tmp")
        arr.tofile(tmp)
        os.replace(tmp, path)
        return (path, t.dtype, tuple(t.shape))

    @staticmethod
    def _get(stored) -> torch.Tensor:
        if isinstance(stored, torch.Tensor):
            return stored
        path, dtype, shape = stored
        if dtype == torch.bfloat16:
            return torch.from_numpy(np.fromfile(path, dtype=np.int16).reshape(shape)).view(torch.bfloat16)
        return torch.from_numpy(np.fromfile(path, dtype=_NP[dtype]).reshape(shape))

    def append(self, hidden: torch.Tensor, kwargs: dict) -> None:
        self._items.append((self._put(len(self._items), hidden), kwargs))

    def __setitem__(self, i: int, value: tuple[torch.Tensor, dict]) -> None:
        hidden, kwargs = value
        self._items[i] = (self._put(i, hidden), kwargs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        stored, kwargs = self._items[i]
        return self._get(stored), kwargs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for i in range(len(self._items)):
            yield self[i]

    def tensors(self) -> Iterator[torch.Tensor]:
        """The hidden-state tensors alone, in order (a replayed consumer's cached inputs)."""
        for h, _ in self:
            yield h

    def clear(self) -> None:
        """Forget every batch and delete its file."""
        for stored, _ in self._items:
            if not isinstance(stored, torch.Tensor):
                stored[0].unlink(missing_ok=True)
        self._items = []

    def nbytes_in_memory(self) -> int:
        return sum(s.numel() * s.element_size() for s, _ in self._items if isinstance(s, torch.Tensor))
