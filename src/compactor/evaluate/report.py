"""Render evaluation results as a terminal/Markdown table or JSON."""

from __future__ import annotations

import json
from typing import Iterable

from compactor.evaluate.harness import EvalResult

_COLUMNS = (
    ("model", lambda r: r.name),
    ("runtime", lambda r: r.runtime),
    ("size MB", lambda r: f"{r.size_bytes / 1e6:.1f}"),
    ("bpw", lambda r: f"{r.bpw:.2f}"),
    ("PPL", lambda r: f"{r.ppl:.3f}"),
    ("KLD mean", lambda r: "" if r.kld_mean is None else f"{r.kld_mean:.5f}"),
    ("KLD p99", lambda r: "" if r.kld_p99 is None else f"{r.kld_p99:.4f}"),
    ("top-1", lambda r: "" if r.top1 is None else f"{100 * r.top1:.2f}%"),
    ("prefill tok/s", lambda r: "" if r.prefill_tok_s is None else f"{r.prefill_tok_s:.0f}"),
    ("decode tok/s", lambda r: "" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}"),
    ("load s", lambda r: f"{r.load_seconds:.2f}"),
    ("peak RSS MB", lambda r: f"{r.peak_rss_bytes / 1e6:.0f}"),
)


def _render(heads: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(heads)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(heads), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def table(results: Iterable[EvalResult], markdown: bool = True) -> str:
    """A Markdown table (also readable on a terminal) of the main metrics; with several
    evaluation domains the metrics are their mean, and :func:`domain_table` follows."""
    results = list(results)
    rows = [[fmt(r) for _, fmt in _COLUMNS] for r in results]
    out = _render([h for h, _ in _COLUMNS], rows)
    if any(r.domains for r in results):
        out += "\n\nper domain (the table above shows their mean):\n\n" + domain_table(results)
    return out


def domain_table(results: Iterable[EvalResult]) -> str:
    """PPL and KLD mean per evaluation domain, one row per result."""
    results = [r for r in results if r.domains]
    specs = list(dict.fromkeys(s for r in results for s in r.domains))
    heads = ["model"] + [f"{s} {m}" for s in specs for m in ("PPL", "KLD")]
    rows = []
    for r in results:
        cells = [r.name]
        for s in specs:
            d = r.domains.get(s, {})
            cells += ["" if "ppl" not in d else f"{d['ppl']:.3f}",
                      "" if d.get("kld_mean") is None else f"{d['kld_mean']:.5f}"]
        rows.append(cells)
    return _render(heads, rows)


def to_json(results: Iterable[EvalResult]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=2)
