"""The report in a real headless Chromium (Debian's ``chromium`` package; CI installs it with
apt). Skipped, with the reason, where no Chromium is installed.

Drives Chromium over the DevTools protocol through its ``--remote-debugging-pipe`` (see
tests/_browser.py): no extra Python package, no port, no network.
"""

import json
import os

import pytest

from qatkit.analysis.report import write_report

from ._browser import Browser, find_chromium
from ._diagnosis import MARCH, example, labelled, stages

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium not installed: apt-get install chromium (or set QATKIT_CHROMIUM)")

# Every table cell with data-k, keyed by the JSON path of its table and the row's index.
CELLS_JS = """
Array.from(document.querySelectorAll('table[data-json]')).flatMap(t =>
  Array.from(t.tBodies[0].rows).flatMap(row =>
    Array.from(row.querySelectorAll('td[data-k]')).map(td => ({
      path: t.dataset.json, i: Number(row.dataset.i), k: td.dataset.k,
      text: td.textContent, v: td.dataset.v, f: td.dataset.f || null}))))
"""


def _at(data, path):
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _shown(value, fmt=None) -> str:
    """How the page writes a JSON value: the report's ``num`` filter, or for ``fmt`` "pct"
    (accuracy in percent, and drops in points) two decimals, "pct-unit" with " %", "list"
    joined by commas."""
    if value is None:
        return "\u2013"
    if fmt == "pct":
        return f"{value:.2f}"
    if fmt == "pct-unit":
        return f"{value:.2f} %"
    if fmt == "list":
        return ", ".join(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return repr(value) if isinstance(value, float) else str(value)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    float_model, calib, _ = stages("conv2", 100.0)
    d = tmp_path_factory.mktemp("browser")
    path = d / "report.html"
    write_report(path, float_model, calib, example(), labelled(), MARCH, budget=2)
    data = json.loads(path.with_suffix(".json").read_text())
    shot = str(d / "report.png")
    with Browser() as b:
        b.open(path.as_uri())
        cells = b.evaluate(CELLS_JS)
        info = b.evaluate("""({
            tables: Array.from(document.querySelectorAll('table.data')).map(t => t.id),
            plots: Array.from(document.querySelectorAll('svg.plot')).map(s => s.dataset.plot),
            marks: document.querySelectorAll('svg.plot circle, svg.plot rect').length,
            judgements: Array.from(document.querySelectorAll('.judgement')).map(
                j => [j.dataset.layer, j.querySelector('.cause').dataset.kind]),
            cards: Array.from(document.querySelectorAll('.card[data-k] .v')).map(
                v => [v.parentNode.dataset.k, v.textContent, v.dataset.f || null, v.dataset.v]),
            fallback: document.querySelector('#fallback').textContent,
            embedded: window.qatkitReport,
            width: document.documentElement.scrollWidth,
        })""")
        # sort the sensitivity table by its "layer" column, then by "rank" descending
        b.evaluate("document.querySelector('#sensitivity-table th[data-k=\"name\"]').click()")
        by_name = b.evaluate("Array.from(document.querySelectorAll("
                             "'#sensitivity-table tbody td[data-k=\"name\"]')).map(td => "
                             "td.textContent)")
        b.evaluate("const th = document.querySelector('#sensitivity-table th[data-k=\"rank\"]');"
                   "th.click(); th.click();")
        by_rank = b.evaluate("Array.from(document.querySelectorAll("
                             "'#sensitivity-table tbody td[data-k=\"rank\"]')).map(td => "
                             "Number(td.textContent))")
        sorted_cells = b.evaluate(CELLS_JS)
        b.screenshot(shot)
        problems, requests = b.problems(), b.requests()
    return {"data": data, "cells": cells, "info": info, "by_name": by_name,
            "by_rank": by_rank, "sorted_cells": sorted_cells, "problems": problems,
            "requests": requests, "shot": shot, "uri": path.as_uri()}


def test_renders_without_errors_or_network(page):
    assert page["problems"] == []
    assert page["requests"] == [page["uri"]]  # the page itself and nothing else


def test_tables_and_plots_are_in_the_dom(page):
    info = page["info"]
    assert set(info["tables"]) >= {"layers-0", "layers-1", "layers-2", "stats-table",
                                   "sensitivity-table", "doctor-table",
                                   "weights-activations-table", "keep-float-table",
                                   "bisect-table", "weight-ranges-table", "histograms-table",
                                   "weight-drift-table", "quant-summary-table"}
    assert {"sqnr-depth", "cosine-depth", "error-histogram", "sensitivity-drop",
            "sensitivity-sqnr", "weights-activations", "keep-float-recovery", "weight-ranges",
            "value-histogram", "weight-drift"} <= set(info["plots"])
    assert "Keeping conv2 in float" in info["fallback"]
    assert info["marks"] > 100  # points and bars were drawn
    assert info["judgements"][0] == ["conv2", "bad-scale"]
    assert info["width"] <= 1280 + 1  # no horizontal overflow at 1280 px


def test_dom_numbers_equal_the_json(page):
    data, cells = page["data"], page["cells"]
    assert len(cells) > 600
    # accuracy columns: rounded on the page, the exact JSON number in data-v
    pct = {(c["path"], c["k"]) for c in cells if c["f"] == "pct"}
    assert {("sensitivity.layers", "metric"), ("sensitivity.layers", "drop"),
            ("all_but_one.layers", "recovery"), ("all_but_one.steps", "metric"),
            ("weights_activations.rows", "metric")} <= pct
    tables = {c["path"] for c in cells}
    assert {"weight_ranges", "histograms", "weight_drift", "quant_summary"} <= tables
    for c in cells:
        expected = _at(data, c["path"])[c["i"]][c["k"]]
        assert c["text"] == _shown(expected, c["f"]), c
        if isinstance(expected, float):
            assert float(c["v"]) == expected  # parses back to the very JSON number
    cards = page["info"]["cards"]
    assert [c[2] for c in cards] == ["pct-unit"] * len(cards)
    for key, text, fmt, v in cards:
        assert text == _shown(_at(data, key), fmt), key
        assert float(v) == _at(data, key)
    assert page["info"]["embedded"] == data


def test_sorting_by_clicking_headers(page):
    assert page["by_name"] == sorted(page["by_name"])
    assert page["by_rank"] == sorted(page["by_rank"], reverse=True)
    data = page["data"]
    for c in page["sorted_cells"]:  # rows moved, numbers still belong to their row
        assert c["text"] == _shown(_at(data, c["path"])[c["i"]][c["k"]], c["f"])


def test_screenshot(page):
    with open(page["shot"], "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width == 1280 and height > 2000  # the whole page, tables and plots
    assert os.path.getsize(page["shot"]) > 50_000
    keep = os.environ.get("QATKIT_REPORT_SCREENSHOT")
    if keep:  # for looking at it
        import shutil
        shutil.copy(page["shot"], keep)
