"""Small self-contained SVG charts for the HTML report (no plotting library, no network).

Each function returns one ``<svg>`` element as a string, drawn from plain lists of numbers
(``None`` = no value: the line breaks there). Every mark carries a ``<title>`` so the browser
shows the exact value on hover.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
_FONT = "font-family='system-ui,sans-serif'"


def _nice(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _short(label: str, n: int = 26) -> str:
    """Long qualified names keep their end (the distinctive part)."""
    return label if len(label) <= n else "…" + label[-(n - 1):]


def _open(kind: str, width: int, height: int, title: str) -> list[str]:
    return [f"<svg class='plot' data-plot='{escape(kind)}' role='img' "
            f"aria-label='{escape(title)}' viewBox='0 0 {width} {height}' "
            f"width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg' {_FONT}>",
            f"<text x='{width / 2:.1f}' y='16' text-anchor='middle' font-size='13' "
            f"font-weight='600'>{escape(title)}</text>"]


def line_chart(x_labels: list[str], series: list[dict[str, Any]], *, title: str,
               y_label: str, kind: str = "line", width: int = 880, height: int = 320,
               y_range: tuple[float, float] | None = None) -> str:
    """Lines over layers. ``series``: dicts with ``name``, ``values`` (one per label, None for
    no value) and optional ``dashed``."""
    shown = [_short(lab) for lab in x_labels]
    longest = max((len(lab) for lab in shown), default=0)
    label_h = 14 + 4.3 * longest  # labels are rotated 40 degrees
    # the legend goes under the x labels: series names can be long
    left, top = 64, 28
    right = 20 + min(110.0, 4.8 * len(shown[-1])) if shown else 20
    bottom = label_h + 12 + 17 * len(series)
    height = max(height, int(top + bottom + 200))
    pw, ph = width - left - right, height - top - bottom
    vals = [v for s in series for v in s["values"] if v is not None and math.isfinite(v)]
    lo, hi = y_range if y_range else ((min(vals), max(vals)) if vals else (0.0, 1.0))
    if hi - lo < 1e-12:  # one value: a narrow band around it (0.9978 -> 0.988..1.008)
        pad = max(abs(hi), 1e-3) * 0.01
        lo, hi = lo - pad, hi + pad
    ticks = _nice(lo, hi)
    lo, hi = min(ticks[0], lo), max(ticks[-1], hi)
    n = max(len(x_labels), 1)

    def X(i: int) -> float:
        return left + (pw * (i + 0.5) / n)

    def Y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    out = _open(kind, width, height, title)
    for t in ticks:
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{Y(t):.1f}' y2='{Y(t):.1f}' "
                   "stroke='#e3e3e3'/>")
        out.append(f"<text x='{left - 6}' y='{Y(t) + 4:.1f}' font-size='11' "
                   f"text-anchor='end'>{_fmt(t)}</text>")
    out.append(f"<text transform='translate(12,{top + ph / 2:.1f}) rotate(-90)' "
               f"font-size='11' text-anchor='middle'>{escape(y_label)}</text>")
    out.append(f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' "
               "stroke='#999'/>")
    for i, lab in enumerate(x_labels):
        out.append(f"<text transform='translate({X(i):.1f},{top + ph + 10}) rotate(40)' "
                   f"font-size='10'>{escape(shown[i])}<title>{escape(lab)}</title></text>")
    for k, s in enumerate(series):
        color = s.get("color") or PALETTE[k % len(PALETTE)]
        dash = " stroke-dasharray='5,4'" if s.get("dashed") else ""
        runs: list[list[str]] = [[]]
        for i, v in enumerate(s["values"]):
            if v is None or not math.isfinite(v):
                runs.append([])
                continue
            runs[-1].append(f"{X(i):.1f},{Y(v):.1f}")
        for r in runs:
            if len(r) > 1:
                out.append(f"<polyline fill='none' stroke='{color}' stroke-width='2'{dash} "
                           f"points='{' '.join(r)}'/>")
        for i, v in enumerate(s["values"]):
            if v is None or not math.isfinite(v):
                continue
            out.append(f"<circle cx='{X(i):.1f}' cy='{Y(v):.1f}' r='3.5' fill='{color}'>"
                       f"<title>{escape(s['name'])} · {escape(x_labels[i])}: {v}</title>"
                       "</circle>")
        ly = top + ph + label_h + 12 + 17 * k
        out.append(f"<line x1='{left}' x2='{left + 24}' y1='{ly}' y2='{ly}' "
                   f"stroke='{color}' stroke-width='2'{dash}/>")
        out.append(f"<text x='{left + 30}' y='{ly + 4}' font-size='11'>"
                   f"{escape(s['name'])}</text>")
    out.append("</svg>")
    return "".join(out)


def bar_chart(labels: list[str], values: list[float | None], *, title: str, x_label: str,
              kind: str = "bars", highlight: set[str] | None = None, width: int = 880,
              bar: int = 20, color: str = PALETTE[0], hi_color: str = PALETTE[1]) -> str:
    """Horizontal bars, one per label, in the order given (negative values to the left)."""
    left, right, top, bottom = 150, 70, 28, 40
    height = top + bottom + bar * max(len(labels), 1)
    pw = width - left - right
    vals = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = min([0.0, *vals]), max([0.0, *vals])
    if hi - lo < 1e-12:
        hi = lo + 1.0
    ticks = _nice(lo, hi)
    lo, hi = min(ticks[0], lo), max(ticks[-1], hi)

    def X(v: float) -> float:
        return left + pw * (v - lo) / (hi - lo)

    out = _open(kind, width, height, title)
    for t in ticks:
        out.append(f"<line x1='{X(t):.1f}' x2='{X(t):.1f}' y1='{top}' "
                   f"y2='{height - bottom}' stroke='#e3e3e3'/>")
        out.append(f"<text x='{X(t):.1f}' y='{height - bottom + 14}' font-size='11' "
                   f"text-anchor='middle'>{_fmt(t)}</text>")
    out.append(f"<text x='{left + pw / 2:.1f}' y='{height - 6}' font-size='11' "
               f"text-anchor='middle'>{escape(x_label)}</text>")
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + i * bar
        out.append(f"<text x='{left - 6}' y='{y + bar * 0.7:.1f}' font-size='11' "
                   f"text-anchor='end'>{escape(lab)}</text>")
        if v is None or not math.isfinite(v):
            continue
        x0, x1 = sorted((X(0.0), X(v)))
        c = hi_color if highlight and lab in highlight else color
        out.append(f"<rect x='{x0:.1f}' y='{y + 3}' width='{max(x1 - x0, 1):.1f}' "
                   f"height='{bar - 6}' fill='{c}'><title>{escape(lab)}: {v}</title></rect>")
        out.append(f"<text x='{x1 + 4:.1f}' y='{y + bar * 0.7:.1f}' font-size='10'>"
                   f"{_fmt(v)}</text>")
    out.append(f"<line x1='{X(0.0):.1f}' x2='{X(0.0):.1f}' y1='{top}' y2='{height - bottom}' "
               "stroke='#555'/>")
    out.append("</svg>")
    return "".join(out)


def histogram(edges: list[float], counts: list[int], *, title: str, unit: str,
              kind: str = "histogram", width: int = 280, height: int = 170) -> str:
    """Bars of ``counts`` between ``edges`` with a log-scaled height (errors are peaked)."""
    left, right, top, bottom = 34, 10, 26, 30
    pw, ph = width - left - right, height - top - bottom
    out = _open(kind, width, height, title)
    if not counts or len(edges) != len(counts) + 1:
        out.append(f"<text x='{width / 2}' y='{height / 2}' text-anchor='middle' "
                   "font-size='11'>no data</text></svg>")
        return "".join(out)
    lo, hi = edges[0], edges[-1]
    top_c = math.log10(max(counts) + 1)
    span = (hi - lo) or 1.0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        x0 = left + pw * (edges[i] - lo) / span
        x1 = left + pw * (edges[i + 1] - lo) / span
        h = ph * math.log10(c + 1) / top_c
        w = max(x1 - x0 - 0.5, 0.5)
        out.append(f"<rect x='{x0:.1f}' y='{top + ph - h:.1f}' width='{w:.1f}'"
                   f" height='{h:.1f}' fill='{PALETTE[0]}'><title>[{edges[i]}, {edges[i + 1]})"
                   f": {c}</title></rect>")
    out.append(f"<line x1='{left}' x2='{left + pw}' y1='{top + ph}' y2='{top + ph}' "
               "stroke='#555'/>")
    for v, anchor in ((lo, "start"), (0.0, "middle"), (hi, "end")):
        x = left + pw * (v - lo) / span
        out.append(f"<text x='{x:.1f}' y='{top + ph + 13}' font-size='10' "
                   f"text-anchor='{anchor}'>{_fmt(v)}</text>")
    out.append(f"<text x='{left + pw / 2:.1f}' y='{height - 3}' font-size='10' "
               f"text-anchor='middle'>error ({'LSB' if unit == 'lsb' else 'absolute'}), "
               "log count</text>")
    out.append("</svg>")
    return "".join(out)


def range_chart(mins: list[float | None], maxs: list[float | None], *, title: str,
                kind: str = "ranges", width: int = 420, height: int = 180) -> str:
    """One vertical bar per channel from its min to its max (x: channel index), with the
    zero line."""
    left, right, top, bottom = 46, 10, 26, 28
    pw, ph = width - left - right, height - top - bottom
    vals = [v for v in (*mins, *maxs) if v is not None and math.isfinite(v)]
    lo, hi = min([0.0, *vals]), max([0.0, *vals])
    if hi - lo < 1e-12:
        hi = lo + 1.0
    ticks = _nice(lo, hi, 4)
    lo, hi = min(ticks[0], lo), max(ticks[-1], hi)
    n = max(len(mins), 1)

    def Y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    out = _open(kind, width, height, title)
    for t in ticks:
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{Y(t):.1f}' y2='{Y(t):.1f}' "
                   "stroke='#eee'/>")
        out.append(f"<text x='{left - 4}' y='{Y(t) + 4:.1f}' font-size='10' "
                   f"text-anchor='end'>{_fmt(t)}</text>")
    w = pw / n
    for i, (a, b) in enumerate(zip(mins, maxs)):
        if a is None or b is None:
            continue
        x = left + w * i
        out.append(f"<rect x='{x + w * 0.1:.2f}' y='{Y(b):.1f}' width='{max(w * 0.8, 0.6):.2f}' "
                   f"height='{max(Y(a) - Y(b), 0.6):.1f}' fill='{PALETTE[0]}'>"
                   f"<title>channel {i}: [{a}, {b}]</title></rect>")
    out.append(f"<line x1='{left}' x2='{left + pw}' y1='{Y(0.0):.1f}' y2='{Y(0.0):.1f}' "
               "stroke='#555'/>")
    out.append(f"<text x='{left + pw / 2:.1f}' y='{height - 6}' font-size='10' "
               f"text-anchor='middle'>output channel (0..{n - 1})</text>")
    out.append("</svg>")
    return "".join(out)


def overlay_histogram(edges: list[float], a: list[int], b: list[int], *, title: str,
                      names: tuple[str, str] = ("float", "fixed point"),
                      kind: str = "value-histogram", width: int = 300, height: int = 180
                      ) -> str:
    """Two histograms on shared ``edges``: ``a`` as an outline, ``b`` as filled bars (log
    count, so that a ReLU's spike at zero does not flatten the rest)."""
    left, right, top, bottom = 30, 10, 26, 40
    pw, ph = width - left - right, height - top - bottom
    out = _open(kind, width, height, title)
    if not edges or len(edges) != len(a) + 1 or len(a) != len(b):
        out.append(f"<text x='{width / 2}' y='{height / 2}' text-anchor='middle' "
                   "font-size='11'>no data</text></svg>")
        return "".join(out)
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    top_c = math.log10(max([*a, *b, 1]) + 1)

    def X(v: float) -> float:
        return left + pw * (v - lo) / span

    def H(c: int) -> float:
        return ph * math.log10(c + 1) / top_c

    for i, c in enumerate(b):
        if c > 0:
            x0, x1 = X(edges[i]), X(edges[i + 1])
            out.append(f"<rect x='{x0:.1f}' y='{top + ph - H(c):.1f}' "
                       f"width='{max(x1 - x0 - 0.4, 0.4):.1f}' height='{H(c):.1f}' "
                       f"fill='{PALETTE[4]}' fill-opacity='0.75'><title>{escape(names[1])} "
                       f"[{edges[i]}, {edges[i + 1]}): {c}</title></rect>")
    pts = [f"{X(edges[0]):.1f},{top + ph:.1f}"]
    for i, c in enumerate(a):
        y = top + ph - H(c)
        pts += [f"{X(edges[i]):.1f},{y:.1f}", f"{X(edges[i + 1]):.1f},{y:.1f}"]
    pts.append(f"{X(edges[-1]):.1f},{top + ph:.1f}")
    out.append(f"<polyline fill='none' stroke='{PALETTE[0]}' stroke-width='1.5' "
               f"points='{' '.join(pts)}'><title>{escape(names[0])}</title></polyline>")
    out.append(f"<line x1='{left}' x2='{left + pw}' y1='{top + ph}' y2='{top + ph}' "
               "stroke='#555'/>")
    for v, anchor in ((lo, "start"), (hi, "end")):
        out.append(f"<text x='{X(v):.1f}' y='{top + ph + 13}' font-size='10' "
                   f"text-anchor='{anchor}'>{_fmt(v)}</text>")
    ly = height - 8
    out.append(f"<line x1='{left}' x2='{left + 16}' y1='{ly - 3}' y2='{ly - 3}' "
               f"stroke='{PALETTE[0]}' stroke-width='1.5'/><text x='{left + 20}' y='{ly}' "
               f"font-size='10'>{escape(names[0])}</text>")
    out.append(f"<rect x='{left + 90}' y='{ly - 8}' width='12' height='8' fill='{PALETTE[4]}'/>"
               f"<text x='{left + 106}' y='{ly}' font-size='10'>{escape(names[1])}</text>")
    out.append("</svg>")
    return "".join(out)


__all__ = ["bar_chart", "histogram", "line_chart", "overlay_histogram", "range_chart"]
