"""Plain-text tables that fit the terminal: cells wrap at spaces only, so identifiers stay whole.

Column widths: each column's natural width when everything fits in ``width``; otherwise the
widest columns give up space first, one character at a time, down to the length of their longest
word (header included). Columns are separated by two spaces.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence

GAP = 2


def terminal_width(default: int = 100) -> int:
    """``$COLUMNS`` or the terminal's width (``default`` when there is no terminal)."""
    return shutil.get_terminal_size((default, 24)).columns


def _longest_word(texts: Sequence[str]) -> int:
    return max((len(w) for t in texts for w in t.split()), default=1)


def column_widths(heads: Sequence[str], rows: Sequence[Sequence[str]], width: int,
                  gap: int = GAP) -> list[int]:
    cols = [[h, *(r[i] for r in rows)] for i, h in enumerate(heads)]
    natural = [max(len(c) for c in col) for col in cols]
    if sum(natural) + gap * (len(heads) - 1) <= width:
        return natural
    floor = [min(n, _longest_word(col)) for n, col in zip(natural, cols)]
    widths = list(natural)
    budget = width - gap * (len(heads) - 1)
    while sum(widths) > budget:
        shrinkable = [i for i, w in enumerate(widths) if w > floor[i]]
        if not shrinkable:
            break  # every column at its longest word: wider than the terminal, words whole
        i = max(shrinkable, key=lambda j: widths[j])
        widths[i] -= 1
    return widths


def render(heads: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None,
           title: str | None = None, gap: int = GAP) -> str:
    """The table as text, at most ``width`` columns wide (the terminal's by default) unless a
    single word is longer than its share."""
    width = width or terminal_width()
    widths = column_widths(heads, rows, width, gap)

    def lines(cells: Sequence[str]) -> list[str]:
        wrapped = [textwrap.wrap(c, w, break_long_words=False, break_on_hyphens=False) or [""]
                   for c, w in zip(cells, widths)]
        out = []
        for i in range(max(len(w) for w in wrapped)):
            parts = [(w[i] if i < len(w) else "").ljust(n) for w, n in zip(wrapped, widths)]
            out.append((" " * gap).join(parts).rstrip())
        return out

    total = sum(widths) + gap * (len(widths) - 1)
    out = [title] if title else []
    out += lines(heads)
    out.append("-" * min(total, width))
    for r in rows:
        out += lines(r)
    return "\n".join(out)
