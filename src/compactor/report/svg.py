"""Inline SVG charts for the HTML report: pure functions from numbers to markup, no network,
no plotting library (the report must open anywhere, offline, as one file)."""

from __future__ import annotations

import math
from html import escape

#: one colour per series / group, readable on white and distinct in grey print
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_W, _H, _L, _R, _T, _B = 760, 380, 70, 100, 34, 50  # size and margins (left, right, top, bottom)


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (powers of ten on a log axis)."""
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mult = (1,) if b - a >= 3 else (1, 2, 5)  # a narrow range needs ticks between decades
        return [m * 10.0 ** e for e in range(a, b + 1) for m in mult]
    if hi == lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + step / 2]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


class _Axes:
    """Maps data to pixels for one chart."""

    def __init__(self, xs: list[float], ys: list[float], logy: bool):
        # A log axis only where the values span more than a factor 20 (else it hides their spread).
        self.logy = logy and all(y > 0 for y in ys) and max(ys) / min(ys) > 20
        self.x0, self.x1 = min(xs), max(xs)
        self.y0, self.y1 = min(ys), max(ys)
        if self.x0 == self.x1:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        pad = (self.x1 - self.x0) * 0.05
        self.x0, self.x1 = self.x0 - pad, self.x1 + pad
        if self.logy:
            self.y0, self.y1 = self.y0 / 1.5, self.y1 * 1.5
        else:
            span = (self.y1 - self.y0) or abs(self.y1) or 1.0
            self.y0, self.y1 = self.y0 - 0.05 * span, self.y1 + 0.05 * span

    def px(self, x: float) -> float:
        return _L + (x - self.x0) / (self.x1 - self.x0) * (_W - _L - _R)

    def py(self, y: float) -> float:
        if self.logy:
            f = (math.log10(y) - math.log10(self.y0)) / (math.log10(self.y1) - math.log10(self.y0))
        else:
            f = (y - self.y0) / (self.y1 - self.y0)
        return _H - _B - f * (_H - _T - _B)

    def frame(self, xlabel: str, ylabel: str) -> list[str]:
        out = [f'<rect x="{_L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" fill="none" stroke="#999"/>']
        for t in _ticks(self.x0, self.x1, False):
            if self.x0 <= t <= self.x1:
                x = self.px(t)
                out.append(f'<line x1="{x:.1f}" y1="{_H - _B}" x2="{x:.1f}" y2="{_H - _B + 4}" stroke="#999"/>'
                           f'<text x="{x:.1f}" y="{_H - _B + 16}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1, self.logy):
            if self.y0 <= t <= self.y1:
                y = self.py(t)
                out.append(f'<line x1="{_L}" y1="{y:.1f}" x2="{_W - _R}" y2="{y:.1f}" stroke="#eee"/>'
                           f'<text x="{_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        out.append(f'<text x="{(_L + _W - _R) / 2}" y="{_H - 12}" text-anchor="middle">{escape(xlabel)}</text>')
        out.append(f'<text transform="translate(16,{(_T + _H - _B) / 2}) rotate(-90)" text-anchor="middle">'
                   f'{escape(ylabel)}</text>')
        return out


def _svg(body: list[str], title: str, height: int = _H, width: int = _W) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{escape(title)}" class="chart" '
            'font-family="sans-serif" font-size="11">' + "".join(body) + "</svg>")


def _legend(groups: list[str]) -> list[str]:
    """One row above the plot area (it never covers a point)."""
    out, x = [], _L
    for i, g in enumerate(groups):
        out.append(f'<rect x="{x}" y="10" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                   f'<text x="{x + 14}" y="19">{escape(g)}</text>')
        x += 30 + 6 * len(g)
    return out


def scatter(points: list[tuple[float, float, str, str]], xlabel: str, ylabel: str, title: str,
            logy: bool = False) -> str:
    """Points ``(x, y, label, group)``: one colour per group, each point labelled."""
    if not points:
        return ""
    ax = _Axes([p[0] for p in points], [p[1] for p in points], logy)
    groups = list(dict.fromkeys(p[3] for p in points))
    body = ax.frame(xlabel, ylabel)
    for x, y, label, g in points:
        c = PALETTE[groups.index(g) % len(PALETTE)]
        body.append(f'<circle cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="4.5" fill="{c}"><title>'
                    f'{escape(label)}: {x:g}, {y:g}</title></circle>'
                    f'<text x="{ax.px(x) + 7:.1f}" y="{ax.py(y) - 6:.1f}" fill="#333">{escape(label[:40])}</text>')
    return _svg(body + _legend(groups), title)


def lines(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
          logy: bool = False) -> str:
    """One polyline with markers per named series."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    ax = _Axes([p[0] for p in pts], [p[1] for p in pts], logy)
    body = ax.frame(xlabel, ylabel)
    for i, (name, s) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{ax.px(x):.1f},{ax.py(y):.1f}" for x, y in s)
        body.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        body += [f'<circle cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="3" fill="{c}"><title>{escape(name)} '
                 f'{x:g}: {y:.4g}</title></circle>' for x, y in s]
    return _svg(body + _legend(list(series)), title)


def bars(items: list[tuple[str, float]], xlabel: str, title: str) -> str:
    """Horizontal bars, one per ``(label, value)``, longest scaled to the width."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1.0
    row, left = 18, 200
    height = _T + row * len(items) + 30
    body = []
    for i, (label, v) in enumerate(items):
        y = _T + i * row
        w = (v / top) * (_W - left - 80)
        body.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{escape(label[-34:])}</text>'
                    f'<rect x="{left}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="{row - 5}" fill="{PALETTE[0]}"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 12}">{v:.4g}</text>')
    body.append(f'<text x="{left}" y="{height - 8}">{escape(xlabel)}</text>')
    return _svg(body, title, height=height)


def heatmap(rows: list[str], cols: list[str], cells: dict[tuple[str, str], tuple[str, float]],
            title: str, low: str = "#e8f1fb", high: str = "#08519c") -> str:
    """A grid of ``cells[(row, col)] = (text, value)``, coloured from ``low`` to ``high`` by
    value; missing cells stay blank."""
    if not rows or not cols:
        return ""
    vals = [v for _, v in cells.values()]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    cw, ch, left, top = max(48, min(90, (_W - 140) // len(cols))), 20, 130, 40

    def mix(f: float) -> str:
        a, b = (int(low[i:i + 2], 16) for i in (1, 3, 5)), (int(high[i:i + 2], 16) for i in (1, 3, 5))
        return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))

    body = [f'<text x="{left + cw * i + cw / 2}" y="{top - 8}" text-anchor="middle">{escape(c)}</text>'
            for i, c in enumerate(cols)]
    for j, r in enumerate(rows):
        body.append(f'<text x="{left - 6}" y="{top + j * ch + 14}" text-anchor="end">{escape(r)}</text>')
        for i, c in enumerate(cols):
            if (r, c) not in cells:
                continue
            text, v = cells[(r, c)]
            f = 0.0 if hi == lo else (v - lo) / (hi - lo)
            fg = "#fff" if f > 0.55 else "#000"
            body.append(f'<rect x="{left + cw * i}" y="{top + j * ch}" width="{cw - 2}" height="{ch - 2}" '
                        f'fill="{mix(f)}"><title>{escape(r)} {escape(c)}: {escape(text)}</title></rect>'
                        f'<text x="{left + cw * i + cw / 2 - 1}" y="{top + j * ch + 13}" text-anchor="middle" '
                        f'fill="{fg}">{escape(text)}</text>')
    return _svg(body, title, height=top + ch * len(rows) + 10, width=max(_W, left + cw * len(cols) + 10))
