"""The search's results as people and programs read them: the Pareto front, the candidates'
Markdown table and the JSON record (:mod:`compactor.search`)."""

from __future__ import annotations

import json

from compactor.search_space import Candidate

__all__ = ["front_table", "pareto", "to_json"]


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """The candidates measured on the evaluation windows that no other beats on both size
    and KLD, smallest first."""
    done = sorted((c for c in cands if c.kld is not None), key=lambda c: (c.size_bytes, c.kld))
    front, best = [], float("inf")
    for c in done:
        if c.kld < best:
            front.append(c)
            best = c.kld
    return front


def front_table(result: dict) -> str:
    """The candidates as a Markdown table: size, bpw, KLD, PPL ratio, front and choice marked."""
    front = {id(c) for c in result["front"]}
    timed = any("decode_speedup" in c.fields for c in result["candidates"])
    spd = " decode tok/s (x F16) |" if timed else ""
    rows = [f"| candidate | predicted MB | bpw | KLD | PPL ratio |{spd} s | |",
            "|---|---|---|---|---|" + "---|" * (3 if timed else 2)]
    ranked_only = False
    for c in sorted(result["candidates"], key=lambda c: c.size_bytes):
        mark = "**chosen**" if c is result["chosen"] else ("front" if id(c) in front else "")
        fast = ""
        if timed:
            fast = (f" {c.fields['decode_tok_s']:.0f} ({c.fields['decode_speedup']:.2f}x) |"
                    if "decode_speedup" in c.fields else " |")
        dagger = "" if c.kld is not None else " †"
        ranked_only = ranked_only or bool(c.measured and dagger)
        kld, ppl = c.score()
        rows.append(f"| {c.label} | {c.size_bytes / 1e6:.2f} | {c.size_bytes * 8 / result['params']:.2f} | "
                    + (f"not built: {c.why_not} | |{' |' if timed else ''} |" if not c.measured
                       else f"{kld:.4f}{dagger} | {ppl:.3f}{dagger} |{fast} {c.seconds:.0f} |")
                    + f" {mark} |")
    tokens = result.get("tokens") or {}
    if ranked_only:
        rows.append(f"\n† measured on the ranking windows only ({tokens.get('ranking')} tokens scored, of the "
                    f"evaluation's {tokens.get('evaluation')}): they ordered the configurations and chose nothing.")
    return "\n".join(rows)


def to_json(result: dict) -> str:
    def one(c):
        return {"label": c.label, "steps": c.steps, "size_bytes": c.size_bytes, "kld": c.kld,
                "ppl_ratio": c.ppl_ratio, "rank_kld": c.rank_kld, "rank_ppl_ratio": c.rank_ppl_ratio,
                "seconds": round(c.seconds, 1), "why_not": c.why_not, **c.fields}

    return json.dumps({"params": result["params"], "tokens": result.get("tokens"), "chosen": one(result["chosen"]),
                       "front": [one(c) for c in result["front"]],
                       "candidates": [one(c) for c in result["candidates"]]}, indent=1)
