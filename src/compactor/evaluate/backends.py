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

    def speed(self, prompt_len: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict:
        """Median prefill and decode throughput in tokens/s."""


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _prompt(vocab: int, n: int) -> list[int]:
    # Fixed pseudo-random token ids: the speed of a dense model does not depend on content.
    rng = np.random.default_rng(0)
    return [int(x) for x in rng.integers(0, vocab, size=n)]


class TorchBackend:
    """An in-memory transformers causal LM."""

    kind = "torch"

    def __init__(self, model, name: str = "model", load_seconds: float = 0.0):
        from compactor.evaluate.size import model_size

        self.model = model.eval()
        self.name = name
        self.load_seconds = load_seconds
        self.size_bytes, self.params = model_size(model)
        self.vocab_size = model.config.vocab_size

    @torch.inference_mode()
    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids[None], use_cache=False).logits[0].float()

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
                 lora_path: str | Path | None = None):
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
                n_threads=n_threads, n_threads_batch=n_threads, verbose=False,
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

    ``directory``: keep the cache on disk, one raw file per window named by the sha256 of
    its token ids, read back per window — memory then holds one window's logits, not all of
    them (64 windows of 512 tokens at a 49k vocabulary are 3.2 GB in float16)."""

    def __init__(self, inner, half: bool = False, directory: str | Path | None = None):
        self.inner = inner
        self.half = half
        for attr in ("name", "kind", "load_seconds", "size_bytes", "params", "vocab_size"):
            setattr(self, attr, getattr(inner, attr))
        self._cache: dict[str, torch.Tensor | tuple] = {}
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _key(ids: torch.Tensor) -> str:
        import hashlib

        return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def _store(self, key: str, logits: torch.Tensor) -> None:
        if self.half:
            logits = (logits - logits.amax(-1, keepdim=True)).to(torch.float16)
        if self.directory is None:
            self._cache[key] = logits
            return
        arr = logits.numpy()
        path = self.directory / f"{key}.{arr.dtype.name}"
        tmp = path.with_suffix(".tmp")
        arr.tofile(tmp)
        tmp.replace(path)  # a reader never sees a half-written window
        self._cache[key] = (path, arr.dtype, tuple(arr.shape))

    def _load(self, key: str) -> torch.Tensor:
        hit = self._cache[key]
        if isinstance(hit, torch.Tensor):
            return hit.float()
        path, dtype, shape = hit
        arr = np.fromfile(path, dtype=dtype)
        if arr.size != int(np.prod(shape)):
            raise CompactorError(f"{path}: cached logits are truncated ({arr.size} values, expected "
                                 f"{int(np.prod(shape))}); delete the cache directory to recompute")
        return torch.from_numpy(arr.reshape(shape)).float()

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        key = self._key(ids)
        if key not in self._cache:
            self._store(key, self.inner.window_logits(ids))
        return self._load(key)

    def iter_logits(self, input_ids: torch.Tensor):
        """Logits of each window of ``input_ids [N, L]``: from the cache, with the missing
        windows computed together by the inner backend (one layer-wise pass if streamed)."""
        keys = [self._key(ids) for ids in input_ids]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            for i, logits in zip(missing, iter_logits(self.inner, input_ids[missing])):
                self._store(keys[i], logits)
        for k in keys:
            yield self._load(k)

    def speed(self, *args, **kwargs) -> dict:
        return self.inner.speed(*args, **kwargs)


def iter_logits(backend, input_ids: torch.Tensor):
    """Window logits of ``input_ids [N, L]`` from any backend: its own ``iter_logits`` (a
    streamed model computes all windows layer by layer), else window by window."""
    if hasattr(backend, "iter_logits"):
        yield from backend.iter_logits(input_ids)
    else:
        for ids in input_ids:
            yield backend.window_logits(ids)
