"""Cut text into fixed-length token windows.

Protocol (stated in every provenance record):

* The text is tokenized once as a single stream, without special tokens.
* ``bos="none"`` (default): a window is a plain slice of ``length`` tokens; ``bos="prepend"``:
  the tokenizer's BOS followed by ``length - 1`` text tokens.
* Windows start every ``stride`` tokens (default: ``length``, non-overlapping). With overlap,
  only tokens not scored by an earlier window are scored.
* Position 0 of a window is context only: the scored tokens are positions 1..length-1,
  each predicted from everything before it in the window.
* A trailing partial window is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from compactor.errors import CompactorError


@dataclass
class TokenWindows:
    """``input_ids [N, L]`` and ``score_mask [N, L]`` (True where the token at that position
    is predicted and counted), plus provenance."""

    input_ids: torch.Tensor
    score_mask: torch.Tensor
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_scored(self) -> int:
        return int(self.score_mask.sum())

    def select(self, idx: list[int]) -> "TokenWindows":
        """The windows at ``idx``, in that order."""
        prov = dict(self.provenance, n_windows=len(idx), selected=len(idx) != len(self))
        out = TokenWindows(self.input_ids[idx], self.score_mask[idx], prov)
        out.provenance["tokens_scored"] = out.n_scored
        return out

    def head(self, n: int) -> "TokenWindows":
        """The first ``n`` windows."""
        prov = dict(self.provenance, n_windows=min(n, len(self)))
        out = TokenWindows(self.input_ids[:n], self.score_mask[:n], prov)
        out.provenance["tokens_scored"] = out.n_scored
        return out


def sample_windows(windows: "TokenWindows | dict[str, TokenWindows]", tokens: int) -> TokenWindows:
    """About ``tokens`` tokens of windows: the first ones, or with several domains an equal
    share of each domain's first windows (e.g. to verify an export on every domain)."""
    if isinstance(windows, TokenWindows):
        return windows.head(max(1, min(len(windows), -(-tokens // windows.length))))
    parts = list(windows.values())
    per = max(1, -(-tokens // (parts[0].length * len(parts))))
    heads = [w.head(min(per, len(w))) for w in parts]
    prov = {"domains": {k: h.provenance for k, h in zip(windows, heads)}, "n_windows": sum(len(h) for h in heads)}
    out = TokenWindows(torch.cat([h.input_ids for h in heads]), torch.cat([h.score_mask for h in heads]), prov)
    out.provenance["tokens_scored"] = out.n_scored
    return out


def make_windows(
    token_ids: list[int] | torch.Tensor,
    length: int = 512,
    stride: int | None = None,
    bos: Literal["none", "prepend"] = "none",
    bos_id: int | None = None,
    max_tokens: int | None = None,
) -> TokenWindows:
    """Windows of ``length`` tokens over a token stream (see the module docstring)."""
    stride = stride or length
    if length < 2:
        raise CompactorError(f"window length must be at least 2, got {length}")
    if not 0 < stride <= length:
        raise CompactorError(f"stride must be in 1..{length}, got {stride}")
    if bos not in ("none", "prepend"):
        raise CompactorError(f"bos policy must be 'none' or 'prepend', got {bos!r}")
    if bos == "prepend" and bos_id is None:
        raise CompactorError("bos='prepend' needs a tokenizer with a BOS token")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    body = length - (1 if bos == "prepend" else 0)
    starts = list(range(0, max(len(ids) - body + 1, 0), stride))
    if max_tokens is not None:
        starts = starts[: max(1, max_tokens // length)]
    if not starts:
        raise CompactorError(f"text has {len(ids)} tokens, fewer than one window of {length}")
    rows, masks = [], []
    scored_until = 0  # first stream index not yet scored
    for s in starts:
        chunk = ids[s : s + body]
        mask = torch.zeros(length, dtype=torch.bool)
        off = length - body
        # Stream index of window position p (p >= off) is s + p - off; score p >= 1 only if
        # that index was not scored by an earlier window.
        first = max(1, scored_until - s + off)
        mask[first:] = True
        scored_until = s + body
        if off:
            chunk = torch.cat([torch.tensor([bos_id]), chunk])
        rows.append(chunk)
        masks.append(mask)
    prov = {
        "window": length,
        "stride": stride,
        "bos": bos,
        "n_windows": len(rows),
        "token_range": [starts[0], starts[-1] + body],
        "stream_tokens": len(ids),
    }
    out = TokenWindows(torch.stack(rows), torch.stack(masks), prov)
    out.provenance["tokens_scored"] = out.n_scored
    return out


def resolve_bos(tokenizer, bos: str) -> str:
    """``auto``: what the model's tokenizer does — ``prepend`` when it puts a BOS first when
    encoding (Gemma's tokenizers do, and without it their perplexity roughly triples), else
    ``none`` — as llama.cpp's perplexity tool follows the GGUF's ``add_bos_token``."""
    if bos != "auto":
        return bos
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return "none"
    ids = tokenizer("a")["input_ids"]
    return "prepend" if ids[:1] == [bos_id] else "none"


def windows_for(
    tokenizer,
    spec: str,
    length: int = 512,
    stride: int | None = None,
    bos: Literal["auto", "none", "prepend"] = "auto",
    max_tokens: int | None = None,
) -> TokenWindows:
    """Load text by ``spec`` (corpus or domain split, ``calib:mix``, or a path), tokenize,
    and cut windows (``bos``: see :func:`resolve_bos`; the choice is in the provenance)."""
    from compactor.data.sources import load_text

    policy, bos = bos, resolve_bos(tokenizer, bos)

    if str(spec) == MIX_SPEC:
        return mix_windows(tokenizer, length, bos, max_tokens)
    # Domain splits are large (the stdlib holds ~25M characters): read only what the
    # requested tokens need, with a generous margin (~6 characters a token).
    max_chars = None if max_tokens is None else max_tokens * 6 + 4096
    text = load_text(spec, tokenizer, max_chars=max_chars)
    ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
    win = make_windows(ids, length, stride, bos, tokenizer.bos_token_id, max_tokens)
    win.provenance = {**text.provenance, "spec": str(spec),
                      "tokenizer": type(tokenizer).__name__, **win.provenance, "bos_policy": policy}
    return win


#: The default calibration set: prose, chat, code and technical text balanced by tokens.
MIX_SPEC = "calib:mix"
#: Windows of ``calib:mix`` when no token count is given (the calibration default, 128 x 512).
MIX_DEFAULT_WINDOWS = 128


def _first(w: TokenWindows, k: int) -> TokenWindows:
    return TokenWindows(w.input_ids[:k], w.score_mask[:k], dict(w.provenance))


def mix_windows(tokenizer, length: int = 512, bos: Literal["auto", "none", "prepend"] = "auto",
                max_tokens: int | None = None) -> TokenWindows:
    """``calib:mix``: an equal share of windows from each calibration split of
    :data:`compactor.data.domains.MIX` (the first domains take one more when the count does
    not divide; a domain whose text runs out gives all of it and the others share the rest),
    interleaved round-robin so that any first ``n`` windows stay as balanced as the text allows."""
    from compactor.data.domains import MIX

    bos = resolve_bos(tokenizer, bos)
    n = MIX_DEFAULT_WINDOWS if max_tokens is None else max(1, max_tokens // length)
    # Equal shares; a domain with less text gives all it has and the others share the rest
    # (a training budget can exceed the smallest domain: Debian's FAQ is ~20k tokens).
    want = {d: n // len(MIX) + (1 if i < n % len(MIX) else 0) for i, d in enumerate(MIX)}
    got: dict[str, TokenWindows] = {}
    short: set[str] = set()
    while True:
        for d in MIX:
            if want[d] and (d not in got or len(got[d]) < want[d]) and d not in short:
                got[d] = windows_for(tokenizer, f"{d}:calib", length, bos=bos, max_tokens=want[d] * length)
                if len(got[d]) < want[d]:
                    short.add(d)
        missing = n - sum(min(len(got[d]), want[d]) for d in got)
        open_ = [d for d in MIX if d not in short]
        if missing <= 0 or not open_:
            break
        for d in MIX:
            want[d] = min(want[d], len(got[d])) if d in short else want[d]
        for i in range(missing):
            want[open_[i % len(open_)]] += 1
    if sum(len(w) for w in got.values()) < n:
        raise CompactorError(f"{MIX_SPEC}: its domains hold {sum(len(w) for w in got.values())} windows of "
                             f"{length} tokens, fewer than the {n} asked for")
    parts, provs = [], {}
    for d in MIX:
        if d in got and want[d]:
            w = got[d] if len(got[d]) <= want[d] else _first(got[d], want[d])
            parts.append(w)
            provs[d] = {**w.provenance, "windows": len(w)}
    order = [(d, i) for i in range(max(len(p) for p in parts)) for d in range(len(parts)) if i < len(parts[d])]
    ids = torch.stack([parts[d].input_ids[i] for d, i in order])
    mask = torch.stack([parts[d].score_mask[i] for d, i in order])
    prov = {"source": "mix", "spec": MIX_SPEC, "domains": provs, "order": "round-robin by domain",
            "window": length, "stride": length, "bos": bos, "n_windows": len(order),
            "tokenizer": type(tokenizer).__name__}
    out = TokenWindows(ids, mask, prov)
    out.provenance["tokens_scored"] = out.n_scored
    return out


def split_specs(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """An evaluation data spec as a list of specs: a list, a comma-separated string, or
    ``domains`` (every domain of :data:`compactor.data.domains.EVAL_DOMAINS`)."""
    from compactor.data.domains import EVAL_DOMAINS

    items = list(spec) if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",")]
    out: list[str] = []
    for s in items:
        out.extend(EVAL_DOMAINS if s == "domains" else [s])
    if not out or any(not s for s in out):
        raise CompactorError(f"evaluation data {spec!r} names an empty spec")
    return out


def domain_windows(tokenizer, spec, length: int = 512, stride: int | None = None,
                   bos: Literal["auto", "none", "prepend"] = "auto",
                   max_tokens: int | None = None) -> dict[str, TokenWindows]:
    """Windows for each evaluation spec (see :func:`split_specs`), by spec; ``max_tokens``
    applies to each domain."""
    return {s: windows_for(tokenizer, s, length, stride, bos, max_tokens) for s in split_specs(spec)}
