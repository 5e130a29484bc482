"""Runtimes that produce logits for token windows: in-memory torch models and GGUF files in
llama.cpp (through ``llama-cpp-python``). The harness treats both alike, so an in-memory
model and an exported file are scored on exactly the same token windows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from compactor.errors import CompactorError


class Backend(Protocol):
    name: str
    kind: str
    load_seconds: float
    size_bytes: int
    params: int
    vocab_size: int

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [L]`` -> float32 logits ``[L, V]`` (row t predicts token t+1)."""

    # Optional: ``iter_chunks(input_ids [N, L], rows)`` yielding ``(window, first row,
    # float32 logits [<= rows, V])`` in order, for a backend that can avoid ever holding a
    # whole window's logits (see :func:`iter_chunks`).

    def speed(self, prompt_len: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict:
        """Median prefill and decode throughput in tokens/s."""


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


#: bytes of float32 logits one evaluation chunk may hold
CHUNK_BYTES = 32 << 20


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per logits chunk, so that a chunk of float32 logits stays near ``budget``
    bytes whatever the vocabulary: 128 at SmolLM2's 49k, 32 at Gemma 3's 262k (a whole
    512-token window of 262k float32 logits would be 537 MB, and the metrics take several
    temporaries of that size)."""
    return max(8, min(128, budget // (4 * max(1, vocab))))


def head_logits(head, h: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits of final hidden states ``h [T, H]`` through the output head, with the
    final logit soft-capping some families apply (Gemma 2: ``cap · tanh(z / cap)``)."""
    logits = head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _prompt(vocab: int, n: int) -> list[int]:
    # Fixed pseudo-random token ids: the speed of a dense model does not depend on content.
    rng = np.random.default_rng(0)
    return [int(x) for x in rng.integers(0, vocab, size=n)]


class TorchBackend:
    """An in-memory transformers causal LM."""

    kind = "torch"
    #: default ``max_window_bytes``
    MAX_WINDOW_BYTES = 256 << 20

    def __init__(self, model, name: str = "model", load_seconds: float = 0.0,
                 max_window_bytes: int = MAX_WINDOW_BYTES):
        from compactor.evaluate.size import deployed_size, model_size

        self.model = model.eval()
        self.name = name
        self.load_seconds = load_seconds
        # A quantized model's size is its deployment's (the GGUF file's tensors), not that of
        # the float embedding it still holds in memory (kept as memory_bytes).
        self.params = model_size(model)[1]
        self.size_bytes, self.memory_bytes = deployed_size(model)
        self.vocab_size = model.config.vocab_size
        #: a window whose float32 logits would pass this runs the decoder once and the head
        #: chunk by chunk (:meth:`iter_chunks`); smaller ones take the model's own forward
        self.max_window_bytes = max_window_bytes

    @torch.inference_mode()
    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids[None], use_cache=False).logits[0].float()

    @torch.inference_mode()
    def iter_chunks(self, input_ids: torch.Tensor, rows: int):
        """``(window, first row, logits [<= rows, V])`` for each window of ``input_ids [N, L]``.

        Why two ways: the model's own forward is the reference behaviour and is kept where a
        window's logits are small; past ``max_window_bytes`` (a 262k vocabulary) the decoder
        runs once per window and only ``rows`` positions at a time go through the head, so
        memory holds ``rows x V`` logits, not ``L x V``."""
        length = input_ids.shape[1]
        if length * self.vocab_size * 4 <= self.max_window_bytes:
            for i, ids in enumerate(input_ids):
                logits = self.window_logits(ids)
                for s in range(0, length, rows):
                    yield i, s, logits[s : s + rows]
            return
        body, head = self.model.get_decoder(), self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        for i, ids in enumerate(input_ids):
            h = body(ids[None], use_cache=False).last_hidden_state[0]  # [L, H], final norm applied
            for s in range(0, length, rows):
                yield i, s, head_logits(head, h[s : s + rows], softcap)

    @torch.inference_mode()
    def speed(self, prompt_len: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict:
        ids = torch.tensor([_prompt(self.vocab_size, prompt_len)])
        self.model(ids[:, :8])  # warm-up
        prefill = _median_time(lambda: self.model(ids, use_cache=True), repeats)

        def decode():
            out = self.model(ids[:, :16], use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                out = self.model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t0

        decode_s = float(np.median([decode() for _ in range(repeats)]))
        return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": gen_tokens / decode_s}


class LlamaCppBackend:
    """A GGUF file run in llama.cpp through ``llama-cpp-python``.

    llama.cpp's CPU kernels quantize activations to 8 bit inside quantized dot products, so
    even a lossless file shows a small KL divergence: that is the runtime we measure.
    """

    kind = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 1024, n_threads: int = 2, name: str | None = None,
                 lora_path: str | Path | None = None, use_mmap: bool = True):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise CompactorError(
                "evaluating a GGUF file in llama.cpp needs llama-cpp-python: "
                "pip install 'compactor[llamacpp]'"
            ) from None
        from compactor.models.load import read_gguf_header

        path = Path(path)
        if not path.is_file():
            raise CompactorError(f"GGUF file not found: {path}")
        read_gguf_header(path)  # a specific error for truncated/corrupt files
        t0 = time.perf_counter()
        try:
            self.llm = Llama(
                str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, logits_all=True,
                n_threads=n_threads, n_threads_batch=n_threads, verbose=False, use_mmap=use_mmap,
                **({"lora_path": str(lora_path)} if lora_path else {}),
            )
        except (ValueError, RuntimeError) as exc:
            raise CompactorError(f"llama.cpp could not load {path}: {exc}") from None
        self.load_seconds = time.perf_counter() - t0
        self.n_ctx = n_ctx
        self.name = name or path.name
        self.path = path
        self.size_bytes = path.stat().st_size
        self.params = int(self.llm._model.n_params())
        self.vocab_size = int(self.llm.n_vocab())

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        if len(ids) > self.n_ctx:
            raise CompactorError(f"window of {len(ids)} tokens exceeds llama.cpp n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def iter_chunks(self, input_ids: torch.Tensor, rows: int):
        """Window by window, copying ``rows`` positions at a time out of llama.cpp's own score
        buffer (which the runtime holds anyway) instead of the whole window."""
        for i, ids in enumerate(input_ids):
            if len(ids) > self.n_ctx:
                raise CompactorError(f"window of {len(ids)} tokens exceeds llama.cpp n_ctx={self.n_ctx}")
            self.llm.reset()
            self.llm.eval([int(t) for t in ids])
            for s in range(0, len(ids), rows):
                yield i, s, torch.from_numpy(np.array(self.llm.scores[s : min(s + rows, len(ids))],
                                                      dtype=np.float32))

    def speed(self, prompt_len: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict:
        prompt = _prompt(self.vocab_size, min(prompt_len, self.n_ctx - gen_tokens - 16))

        def prefill():
            self.llm.reset()
            self.llm.eval(prompt)

        prefill_s = _median_time(prefill, repeats)

        def decode():
            self.llm.reset()
            self.llm.eval(prompt[:16])
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
                self.llm.eval([nxt])
            return time.perf_counter() - t0

        decode_s = float(np.median([decode() for _ in range(repeats)]))
        return {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": gen_tokens / decode_s}

    def close(self) -> None:
        self.llm.close()


class CachedBackend:
    """Remembers another backend's window logits, so a reference scored against many
    candidates runs once per window. float32 costs 4 bytes per token and vocabulary entry
    (0.2 MB per token at 49k); ``half=True`` stores ``logits - max`` in float16 (half that):
    softmax is shift-invariant, and the rounding (< 0.001 for logits within 2 of the top,
    coarser only where probabilities are below e^-16) moves KL by less than 1e-6.

    ``directory``: keep the cache on disk, one raw ``[L, V]`` file per window named by the
    sha256 of its token ids, written and read back a chunk of positions at a time — memory
    then holds one chunk's logits, not all of them (64 windows of 512 tokens at a 49k
    vocabulary are 3.2 GB in float16; one 512-token window at 262k is 268 MB)."""

    def __init__(self, inner, half: bool = False, directory: str | Path | None = None):
        self.inner = inner
        self.half = half
        for attr in ("name", "kind", "load_seconds", "size_bytes", "params", "vocab_size"):
            setattr(self, attr, getattr(inner, attr))
        #: key -> list of in-memory chunks, or (path, dtype, (L, V)) of an on-disk window
        self._cache: dict[str, list | tuple] = {}
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _key(ids: torch.Tensor) -> str:
        import hashlib

        return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def _encode(self, logits: torch.Tensor) -> torch.Tensor:
        if self.half:
            return (logits - logits.amax(-1, keepdim=True)).to(torch.float16)
        return logits

    def fill(self, input_ids: torch.Tensor, rows: int) -> None:
        """Compute the windows of ``input_ids [N, L]`` not yet cached, together (one
        layer-wise pass if the inner backend is streamed), chunk by chunk into the cache."""
        keys = [self._key(ids) for ids in input_ids]
        missing, seen = [], set()
        for i, k in enumerate(keys):  # each distinct uncached window once
            if k not in self._cache and k not in seen:
                seen.add(k)
                missing.append(i)
        if not missing:
            return
        length = input_ids.shape[1]
        dtype = np.float16 if self.half else np.float32
        current, out, tmp = None, None, None
        try:
            for j, _s, logits in iter_chunks(self.inner, input_ids[missing], rows):
                key = keys[missing[j]]
                if key != current:
                    self._close(current, out, tmp, length, dtype)
                    current, out, tmp = key, [], None
                    if self.directory is not None:
                        tmp = self.directory / f"{key}.tmp"
                        out = open(tmp, "wb")
                chunk = self._encode(logits)
                if self.directory is None:
                    out.append(chunk)
                else:
                    chunk.numpy().tofile(out)
            self._close(current, out, tmp, length, dtype)
            current = None
        finally:
            if current is not None and tmp is not None:
                out.close()
                tmp.unlink(missing_ok=True)

    def _close(self, key, out, tmp, length: int, dtype) -> None:
        if key is None:
            return
        if tmp is None:
            self._cache[key] = out
            return
        out.close()
        path = self.directory / f"{key}.{np.dtype(dtype).name}"
        tmp.replace(path)  # a reader never sees a half-written window
        self._cache[key] = (path, dtype, (length, self.vocab_size))

    def _chunks(self, key: str, rows: int):
        hit = self._cache[key]
        if isinstance(hit, list):
            whole = torch.cat(hit) if len(hit) > 1 else hit[0]
            for s in range(0, whole.shape[0], rows):
                yield s, whole[s : s + rows].float()
            return
        path, dtype, (length, vocab) = hit
        item = np.dtype(dtype).itemsize
        if path.stat().st_size != length * vocab * item:
            raise CompactorError(f"{path}: cached logits are truncated ({path.stat().st_size} bytes, "
                                 f"expected {length * vocab * item}); delete the cache directory to "
                                 "recompute")
        with open(path, "rb") as f:  # plain reads: a memory map would keep every page in RSS
            for s in range(0, length, rows):
                n = min(rows, length - s)
                arr = np.fromfile(f, dtype=dtype, count=n * vocab)
                yield s, torch.from_numpy(arr.reshape(n, vocab)).float()

    def iter_chunks(self, input_ids: torch.Tensor, rows: int):
        """``(window, first row, logits [<= rows, V])`` of every window, from the cache."""
        self.fill(input_ids, rows)
        for i, ids in enumerate(input_ids):
            for s, chunk in self._chunks(self._key(ids), rows):
                yield i, s, chunk

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([c for _, _, c in self.iter_chunks(ids[None], CHUNK_ROWS_WHOLE)])

    def speed(self, *args, **kwargs) -> dict:
        return self.inner.speed(*args, **kwargs)


#: rows per read when a whole window is asked for
CHUNK_ROWS_WHOLE = 1 << 20


def iter_chunks(backend, input_ids: torch.Tensor, rows: int):
    """``(window index, first row, float32 logits [<= rows, V])`` for every window of
    ``input_ids [N, L]``, in order and ``rows`` positions at a time: the backend's own
    ``iter_chunks`` where it has one (torch, streamed, llama.cpp, cached never hold more than
    a chunk beyond what the runtime itself keeps), else sliced from whole windows."""
    if hasattr(backend, "iter_chunks"):
        yield from backend.iter_chunks(input_ids, rows)
        return
    for i, ids in enumerate(input_ids):
        logits = backend.window_logits(ids)
        for s in range(0, logits.shape[0], rows):
            yield i, s, logits[s : s + rows]
