"""The measuring stick: ``evaluate(model, windows, reference=None)``.

Scores a candidate (in-memory model or GGUF file) on token windows, streaming window by
window: perplexity; against a reference, mean and 99th-percentile KL(reference || candidate)
per token and top-1 agreement; plus size, bits per weight, load time, prefill/decode speed
and peak RSS.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from compactor.data.windows import TokenWindows
from compactor.errors import CompactorError
from compactor.evaluate.backends import (Backend, CachedBackend, LlamaCppBackend, TorchBackend,
                                         chunk_rows, iter_chunks)
from compactor.evaluate.streamed import StreamedBackend
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.evaluate.metrics import StreamingStats


@dataclass
class EvalResult:
    """Everything the harness measures for one candidate."""

    name: str
    runtime: str
    ppl: float
    tokens: int
    size_bytes: int
    params: int
    bpw: float
    load_seconds: float
    eval_seconds: float
    eval_tok_s: float
    peak_rss_bytes: int
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    reference: str | None = None
    ref_ppl: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    windows: dict = field(default_factory=dict)
    #: per evaluation domain (spec -> ppl, tokens, and against a reference ref_ppl,
    #: kld_mean, kld_p99, top1); with more than one domain the headline metrics above are
    #: their mean (:func:`mean_over_domains`)
    domains: dict = field(default_factory=dict)
    #: bytes the model takes in memory, where that differs from ``size_bytes`` (a quantized
    #: torch model: ``size_bytes`` is its GGUF file's tensors, the float embedding Q8_0)
    memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_backend(obj, name: str | None = None, n_ctx: int = 1024) -> Backend:
    """Wrap a model, a LoadedModel, a GGUF path or an existing backend as a Backend."""
    from compactor.models.load import LoadedModel

    if hasattr(obj, "window_logits"):
        return obj
    if isinstance(obj, LoadedModel):
        if obj.streamed:
            return StreamedBackend(obj, name)
        return TorchBackend(obj.model, name or obj.source, obj.load_seconds)
    if isinstance(obj, (str, Path)) and str(obj).endswith(".gguf"):
        return LlamaCppBackend(obj, n_ctx=n_ctx, name=name)
    if hasattr(obj, "config") and hasattr(obj, "forward"):
        return TorchBackend(obj, name or type(obj).__name__)
    raise CompactorError(
        f"cannot evaluate {obj!r}: give a transformers model, a LoadedModel or a .gguf path"
    )


def mean_over_domains(per_domain: dict[str, dict]) -> dict:
    """The headline of a multi-domain evaluation: every domain weighs the same, whatever its
    token count. PPL is the geometric mean (the exp of the mean NLL per domain); KLD mean,
    KLD p99 and top-1 are arithmetic means of the domains' values; tokens are summed."""
    import math

    vals = list(per_domain.values())
    out = {"ppl": math.exp(sum(math.log(v["ppl"]) for v in vals) / len(vals)),
           "tokens": sum(v["tokens"] for v in vals)}
    if all("kld_mean" in v for v in vals):
        out["ref_ppl"] = math.exp(sum(math.log(v["ref_ppl"]) for v in vals) / len(vals))
        for k in ("kld_mean", "kld_p99", "top1"):
            out[k] = sum(v[k] for v in vals) / len(vals)
    return out


def evaluate(
    model,
    windows: TokenWindows | dict[str, TokenWindows],
    reference=None,
    speed: bool = True,
    name: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score ``model`` on ``windows``; compare with ``reference`` when given.

    ``model`` / ``reference``: transformers model, :class:`LoadedModel`, ``.gguf`` path or a
    backend. ``windows``: one set of windows, or several by domain (``{spec: windows}``):
    each domain is scored on its own (``EvalResult.domains``) and the headline is their
    mean. Peak RSS is the process's peak during this call (the reference included).
    """
    by_domain = windows if isinstance(windows, dict) else {"": windows}
    if not by_domain:
        raise CompactorError("no evaluation windows given")
    n_ctx = max(1024, max(w.length for w in by_domain.values()) + 160)
    cand = as_backend(model, name, n_ctx)
    ref = as_backend(reference, None, n_ctx) if reference is not None else None
    if ref is not None and ref.vocab_size != cand.vocab_size:
        raise CompactorError(
            f"vocabulary mismatch: {cand.name} has {cand.vocab_size} tokens, reference "
            f"{ref.name} has {ref.vocab_size}; KL divergence needs the same tokenizer"
        )
    for spec, win in by_domain.items():
        if int(win.input_ids.max()) >= cand.vocab_size:
            raise CompactorError(
                f"token id {int(win.input_ids.max())} of {spec or 'the windows'} is outside "
                f"{cand.name}'s vocabulary of {cand.vocab_size}: the windows were made with "
                "another tokenizer"
            )
    reset_peak_rss()
    per_domain: dict[str, dict] = {}
    t0 = time.perf_counter()
    # Logits move in chunks of positions sized to the vocabulary, so a 262k-vocabulary model
    # never has a whole window's logits (537 MB at 512 tokens) in memory, let alone two.
    rows = chunk_rows(cand.vocab_size)
    for spec, win in by_domain.items():
        stats = StreamingStats()
        length = win.length
        if isinstance(ref, CachedBackend):
            # Filled first (one pass, layer by layer if streamed), so a streamed reference
            # and candidate never run at the same time.
            ref.fill(win.input_ids, rows)
        ref_iter = None if ref is None else iter_chunks(ref, win.input_ids, rows)
        bar = tqdm(total=len(win), desc=f"eval {cand.name} {spec}".rstrip(), disable=not progress,
                   unit="win", leave=False)
        for i, s, logits in iter_chunks(cand, win.input_ids, rows):
            ref_logits = None
            if ref_iter is not None:
                j, rs, ref_logits = next(ref_iter)
                if (j, rs) != (i, s) or ref_logits.shape != logits.shape:
                    raise CompactorError(f"{ref.name} and {cand.name} gave logits of different "
                                         f"shapes at window {i}, position {s}")
            # Row t of the logits predicts token t+1: rows [s, e) score ids[s+1 : e+1], and
            # the window's last row predicts nothing.
            e = min(s + logits.shape[0], length - 1)
            if e > s:
                ids, mask = win.input_ids[i], win.score_mask[i]
                stats.update(logits[: e - s], ids[s + 1 : e + 1], mask[s + 1 : e + 1],
                             None if ref_logits is None else ref_logits[: e - s])
            if s + logits.shape[0] >= length:
                bar.update(1)
        bar.close()
        per_domain[spec] = stats.summary()
    eval_seconds = time.perf_counter() - t0
    summary = per_domain[""] if "" in per_domain else mean_over_domains(per_domain)
    n_tokens = sum(w.input_ids.numel() for w in by_domain.values())
    speeds = cand.speed() if speed else {}  # empty for a streamed model
    return EvalResult(
        name=name or cand.name,
        runtime=cand.kind,
        ppl=summary["ppl"],
        tokens=summary["tokens"],
        size_bytes=cand.size_bytes,
        memory_bytes=getattr(cand, "memory_bytes", None),
        params=cand.params,
        bpw=cand.size_bytes * 8 / cand.params,
        load_seconds=cand.load_seconds,
        eval_seconds=eval_seconds,
        eval_tok_s=n_tokens / eval_seconds,
        peak_rss_bytes=peak_rss_bytes(),
        prefill_tok_s=speeds.get("prefill_tok_s"),
        decode_tok_s=speeds.get("decode_tok_s"),
        reference=ref.name if ref is not None else None,
        ref_ppl=summary.get("ref_ppl"),
        kld_mean=summary.get("kld_mean"),
        kld_p99=summary.get("kld_p99"),
        top1=summary.get("top1"),
        windows=(by_domain[""].provenance if "" in by_domain
                 else {spec: w.provenance for spec, w in by_domain.items()}),
        domains={} if "" in by_domain else per_domain,
    )
