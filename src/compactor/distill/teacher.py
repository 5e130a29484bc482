"""Where the soft targets come from.

* :class:`LiveTeacher` runs the teacher on every batch (logits, and hidden states / attention
  maps when a feature loss needs them).
* :class:`TopKCache` runs it once over the training windows and keeps each position's top-k
  log-probs on disk (compressed ``.npz`` shards, read back with ``allow_pickle=False``), so
  later epochs and later runs on the same windows cost no teacher forward.
* :func:`generate_windows` writes teacher-sampled text as new training windows
  (sequence-level KD, Kim & Rush, 2016, arXiv:1606.07947).
* :func:`sample_continuations` lets the student write continuations that the live teacher
  then scores (on-policy distillation, GKD).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from compactor.errors import CompactorError


@dataclass
class TeacherOut:
    """Teacher targets for one micro-batch. Either full ``logits [B, T, V]`` or top-k
    ``top_idx``/``top_logp [B, T, k]``; ``hidden``/``attentions`` per layer when asked."""

    logits: torch.Tensor | None = None
    top_idx: torch.Tensor | None = None
    top_logp: torch.Tensor | None = None
    hidden: tuple | None = None
    attentions: tuple | None = None


class LiveTeacher:
    """A frozen teacher run in inference mode on each micro-batch."""

    kind = "live"

    def __init__(self, model, autocast: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.autocast = autocast

    @torch.no_grad()
    def targets(self, ids: torch.Tensor, index: torch.Tensor | None = None, hidden: bool = False,
                attentions: bool = False) -> TeacherOut:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(input_ids=ids, output_hidden_states=hidden, output_attentions=attentions,
                             use_cache=False)
        return TeacherOut(logits=out.logits.float(), hidden=out.hidden_states if hidden else None,
                          attentions=out.attentions if attentions else None)


def windows_digest(ids: torch.Tensor) -> str:
    """Fingerprint of a set of token windows (the cache is only valid for exactly these)."""
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class TopKCache:
    """Teacher top-k log-probs for every position of ``ids [N, T]``, stored in ``directory``.

    Building is resumable: shards already on disk are kept. ``meta.json`` records the teacher,
    k and the windows' digest; a cache built for other windows or another teacher is refused.
    """

    kind = "cache"
    SHARD = 64  # windows per shard

    def __init__(self, directory: str | Path, ids: torch.Tensor, k: int, teacher_id: str):
        self.dir = Path(directory)
        self.ids, self.k, self.teacher_id = ids, k, teacher_id
        self.meta = {"teacher": teacher_id, "k": k, "windows": windows_digest(ids),
                     "n_windows": int(ids.shape[0]), "window": int(ids.shape[1])}
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CompactorError(f"{meta_path}: not valid JSON ({exc}); delete the cache directory "
                                     "to rebuild it") from None
            if found != self.meta:
                diff = [key for key in self.meta if found.get(key) != self.meta[key]]
                raise CompactorError(f"{self.dir}: teacher cache was built for other {', '.join(diff)} "
                                     f"({ {key: found.get(key) for key in diff} }); delete it or choose another directory")

    def _shard_path(self, s: int) -> Path:
        return self.dir / f"shard_{s:05d}.npz"

    def build(self, teacher, micro_batch: int = 4, autocast: bool = False, progress: bool = True) -> None:
        """Run the teacher over every window not cached yet. ``teacher``: a model in memory,
        or a streamed :class:`~compactor.models.load.LoadedModel` — then each shard's windows
        go through the teacher one layer at a time, and its logits are reduced to the top k
        a chunk of positions at a time."""
        from compactor.models.load import LoadedModel

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps(self.meta, indent=1))
        streamed = isinstance(teacher, LoadedModel)
        n_shards = -(-self.ids.shape[0] // self.SHARD)
        todo = [s for s in range(n_shards) if not self._shard_path(s).exists()]
        vocab = (teacher.model.config if streamed else teacher.config).vocab_size
        idx_dtype = np.uint16 if vocab <= 65536 else np.int32
        for s in tqdm(todo, desc="teacher top-k cache", unit="shard", disable=not progress):
            chunk = self.ids[s * self.SHARD:(s + 1) * self.SHARD]
            tops, logps = [], []
            for v, j in (_streamed_topk(teacher, chunk, self.k) if streamed
                         else _live_topk(LiveTeacher(teacher, autocast), chunk, micro_batch, self.k)):
                tops.append(j.numpy().astype(idx_dtype))
                logps.append(v.numpy().astype(np.float16))
            tmp = self._shard_path(s).with_suffix(".tmp.npz")
            np.savez_compressed(tmp, idx=np.concatenate(tops), logp=np.concatenate(logps))
            tmp.rename(self._shard_path(s))  # a killed build leaves no half shard

    def _load(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if s not in self._shards:
            path = self._shard_path(s)
            if not path.exists():
                raise CompactorError(f"{path}: teacher cache shard missing (build the cache first)")
            self._shards[s] = self._read_shard(path, s)
            if len(self._shards) > 8:
                self._shards.pop(next(iter(self._shards)))
        return self._shards[s]

    def _read_shard(self, path: Path, s: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's arrays, checked: readable, the windows and k it must hold."""
        rows = min(self.SHARD, self.ids.shape[0] - s * self.SHARD)
        want = (rows, self.ids.shape[1], self.k)
        try:
            with np.load(path, allow_pickle=False) as z:
                idx, logp = z["idx"], z["logp"]
        except Exception as exc:  # a damaged zip/zlib stream raises assorted types (BadZipFile, zlib.error, ...)
            raise CompactorError(f"{path}: damaged teacher cache shard ({type(exc).__name__}: {exc}); "
                                 "delete it to rebuild") from None
        if idx.shape != want or logp.shape != want or idx.dtype.kind not in "iu" or logp.dtype.kind != "f":
            raise CompactorError(f"{path}: teacher cache shard holds {idx.dtype}{list(idx.shape)} / "
                                 f"{logp.dtype}{list(logp.shape)}, expected integer and float {list(want)}; "
                                 "delete it to rebuild")
        return idx, logp

    def targets(self, ids: torch.Tensor, index: torch.Tensor, hidden: bool = False,
                attentions: bool = False) -> TeacherOut:
        if hidden or attentions:
            raise CompactorError("a cached teacher keeps only top-k log-probs; hidden-state and "
                                 "attention losses need teacher: live")
        idx, lp = [], []
        for w in index.tolist():
            a, b = self._load(w // self.SHARD)
            idx.append(torch.from_numpy(a[w % self.SHARD].astype(np.int64)))
            lp.append(torch.from_numpy(b[w % self.SHARD].astype(np.float32)))
        return TeacherOut(top_idx=torch.stack(idx), top_logp=torch.stack(lp))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("shard_*.npz"))


def _live_topk(live: LiveTeacher, ids: torch.Tensor, micro_batch: int, k: int):
    """Top-k (log-probs, token ids) ``[b, T, k]`` of ``ids [N, T]``, ``micro_batch`` windows
    at a time."""
    for i in range(0, len(ids), micro_batch):
        yield torch.log_softmax(live.targets(ids[i:i + micro_batch]).logits, -1).topk(k, dim=-1)


def _streamed_topk(loaded, ids: torch.Tensor, k: int):
    """Top-k (log-probs, token ids) ``[1, T, k]`` of each window of ``ids [N, T]`` from a
    streamed teacher: every layer once over all the windows, then the head a chunk of
    positions at a time, so a window's full logits are never held (537 MB per 512-token
    window at a 262k vocabulary)."""
    from compactor.evaluate.backends import chunk_rows
    from compactor.evaluate.streamed import StreamedBackend

    be = StreamedBackend(loaded, "teacher")
    window, vals, idx = 0, [], []
    for w, _s, logits in be.iter_chunks(ids, chunk_rows(be.vocab_size)):
        if w != window:
            yield torch.cat(vals)[None], torch.cat(idx)[None]
            window, vals, idx = w, [], []
        v, j = torch.log_softmax(logits, -1).topk(k, dim=-1)
        vals.append(v)
        idx.append(j)
    if vals:
        yield torch.cat(vals)[None], torch.cat(idx)[None]


@torch.no_grad()
def sample_continuations(model, prompts: torch.Tensor, length: int, generator: torch.Generator,
                         temperature: float = 1.0) -> torch.Tensor:
    """Extend ``prompts [B, P]`` to ``[B, length]`` by sampling from ``model`` (KV-cached).

    Sampling uses ``generator`` only, so a resumed run draws the same tokens."""
    was_training = model.training
    model.eval()
    ids = prompts
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    for _ in range(length - prompts.shape[1]):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, -1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
    model.train(was_training)
    return ids


def generate_windows(teacher_model, prompts: torch.Tensor, prompt_len: int, seed: int = 0,
                     temperature: float = 1.0, micro_batch: int = 8, progress: bool = True) -> torch.Tensor:
    """Sequence-level KD data: the first ``prompt_len`` tokens of each window of ``prompts
    [N, T]`` continued by the teacher to ``T`` tokens. Returns ``[N, T]``."""
    if not 0 < prompt_len < prompts.shape[1]:
        raise CompactorError(f"prompt_len must be in 1..{prompts.shape[1] - 1}, got {prompt_len}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in tqdm(range(0, len(prompts), micro_batch), desc="teacher generates", disable=not progress):
        rows.append(sample_continuations(teacher_model, prompts[i:i + micro_batch, :prompt_len],
                                         prompts.shape[1], g, temperature))
    return torch.cat(rows)
