"""The HTML/JSON report and ``qatkit report`` (qatkit.analysis.report); the browser test is
tests/test_report_browser.py."""

import json
import re
import textwrap

import pytest
import torch

import qatkit as qk
from qatkit.analysis.report import build, damage, render_html, write_report
from qatkit.cli import main as cli

from ._diagnosis import MARCH, example, labelled, stages


def _embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="qatkit-report-data">(.*?)</script>',
                  page, re.S)
    assert m, "embedded JSON missing"
    return json.loads(m.group(1))


def _self_contained(page: str) -> None:
    assert not re.search(r"<link\b|@import|\burl\(|\bsrc\s*=", page, re.I)
    hrefs = re.findall(r"""href\s*=\s*["']([^"']*)""", page, re.I)
    # in-page anchors, and the rule pages each finding links to (opened only when clicked)
    assert hrefs and all(h.startswith("#") or re.search(r"docs/rules/QK\d{3}\.md$", h)
                         for h in hrefs), hrefs
    assert any(h.endswith(".md") for h in hrefs)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


@pytest.fixture(scope="module")
def damaged_report(tmp_path_factory):
    float_model, calib, _ = stages("conv2", 20.0)
    path = tmp_path_factory.mktemp("report") / "damaged.html"
    r = write_report(path, float_model, calib, example(), labelled(), MARCH, budget=2,
                     quant_label="calibrated")
    return path, r


def test_files_and_numbers_agree(damaged_report):
    path, r = damaged_report
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk == json.loads(json.dumps(r))
    page = path.read_text()
    assert _embedded(page) == on_disk
    _self_contained(page)
    assert r["files"] == {"html": "damaged.html", "json": "damaged.json"}
    assert [(c["a"], c["b"]) for c in r["comparisons"]] == [
        ("float (same weights)", "calibrated"), ("calibrated", "fixed point"),
        ("float (same weights)", "fixed point")]
    assert r["march"]["name"] == "nash-e" and "qint16" in r["march"]["activation_dtypes"]
    assert r["metrics"]["name"] == "accuracy" and r["metrics"]["samples"] == 450
    assert r["stats"]["stage"] == "fake quant" and r["sensitivity"]["budget"] == 2
    assert set(r["timing"]) >= {"compare", "stats", "sensitivity", "doctor", "total"}


def test_the_damaged_layer_is_found(damaged_report):
    _, r = damaged_report
    assert r["summary"]["worst_layer"] == "conv2"
    assert all(c["ranking"][0] == "conv2" for c in r["comparisons"])
    assert r["sensitivity"]["layers"][0]["name"] == "conv2"
    assert r["summary"]["causes"] == {"conv2": "bad-scale"}
    assert r["causes"][0]["causes"][0]["code"] == "QK105"
    assert r["sensitivity"]["suggestion"][0] == "conv2"
    applied = r["sensitivity"]["applied"]
    assert applied["layers"] == r["sensitivity"]["suggestion"]
    assert applied["after"] >= applied["before"]
    assert any(f["code"] == "QK105" and f["module"] == "conv2"
               for f in r["doctor"]["findings"])
    # the page shows it
    page = render_html(r)
    assert 'class="judgement" data-layer="conv2"' in page
    assert "bad scale: far too large for the data" in page


def test_page_has_every_section_and_plot(damaged_report):
    path, _ = damaged_report
    page = path.read_text()
    for sec in ("summary", "causes", "doctor", "march", "layers", "plots", "stats",
                "sensitivity"):
        assert f'<section id="{sec}">' in page
    for kind in ("sqnr-depth", "cosine-depth", "error-histogram", "sensitivity-drop",
                 "sensitivity-sqnr"):
        assert f"data-plot='{kind}'" in page
    assert page.count("data-plot='error-histogram'") == 6
    assert page.count('<table class="data sortable"') == 3 + 1 + 1 + 1 + 1  # + change log


def test_fixed_point_only_and_unlabelled_data(tmp_path):
    float_model, _, fixed = stages("conv2", 20.0)
    x, _ = labelled(200)
    r = write_report(tmp_path / "fp.html", float_model, fixed, example(), x)
    assert len(r["comparisons"]) == 1 and r["comparisons"][0]["a"] == "float"
    assert r["sensitivity"] is None and "converted" in r["sensitivity_skipped"]
    assert r["metrics"]["name"] == "top-1 agreement with float"
    assert r["metrics"]["float"] == 1.0 and r["metrics"]["fake_quant"] is None
    assert r["summary"]["worst_layer"] == "conv2"
    assert r["causes"][0]["layer"] == "conv2" and r["stats"]["stage"] == "fixed point"
    assert r["causes"][0]["causes"][0]["kind"] == "bad-scale"  # from the integer outputs
    _self_contained((tmp_path / "fp.html").read_text())


def test_original_float_reference():
    float_model, calib, _ = stages("conv2", 20.0)
    r = build(float_model, calib, example(), labelled(64), reference="float", budget=0)
    assert [(c["a"], c["b"]) for c in r["comparisons"]] == [
        ("float", "fake quant"), ("fake quant", "fixed point"), ("float", "fixed point")]
    assert any("fused" in n for n in r["comparisons"][0]["notes"])
    assert r["summary"]["worst_layer"] == "conv2" and r["sensitivity"]["suggestion"] == []


def test_user_mistakes_are_clear(tmp_path):
    float_model, calib, fixed = stages()
    with pytest.raises(qk.QatkitError, match="float model"):
        build(float_model, float_model, example())
    with pytest.raises(qk.QatkitError, match="first model must be the float"):
        build(calib, fixed, example())
    with pytest.raises(qk.QatkitError, match="overwritten by its JSON"):
        write_report(tmp_path / "r.json", float_model, calib, example())
    with pytest.raises(qk.QatkitError, match=r"\(x, y\)"):
        build(float_model, calib, example(), data=(1, 2, 3))
    with pytest.raises(qk.QatkitError, match="reference must be"):
        build(float_model, calib, example(), reference="fused")
    with pytest.raises(qk.QatkitError, match="no calibrated output fake quant"):
        damage(calib, "conv3")
    with pytest.raises(qk.QatkitError, match="no module named"):
        damage(calib, "nope")


def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "demo.html"
    torch.manual_seed(0)
    code = cli.main(["report", "--demo", "--epochs", "2", "--qat-epochs", "1", "--damage",
                     "conv2", "--output", str(out), "--json"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["worst_layer"] == "conv2" and line["causes"] == {"conv2": "bad-scale"}
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["model"]["stage"] == "QAT" and len(r["monitor"]) == 1
    assert r["monitor"][0]["gap"] == pytest.approx(
        r["monitor"][0]["fake_quant"] - r["monitor"][0]["fixed_point"], abs=1e-6)
    assert "data-plot='monitor'" in out.read_text()


def test_cli_file_func(tmp_path, capsys):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch
        import qatkit as qk
        from qatkit.quantization.calibrate import calibrate
        from qatkit.demo.recipe import DemoNet

        def build():
            torch.manual_seed(0)
            m = DemoNet(10, width=8).eval()
            x = torch.randn(64, 1, 8, 8)
            with qk.set_march("bayes"):
                c = calibrate(qk.prepare(m, x[:2], qconfig=qk.default_calibration_qconfig()),
                              [x])
            return m, c, x[:2], (x, torch.randint(0, 10, (64,)))

        def wrong():
            return 1
    """))
    out = tmp_path / "file.html"
    assert cli.main(["report", f"{src}:build", "--output", str(out), "--samples", "32"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and out.exists()
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["march"]["name"] == "bayes" and r["comparisons"][0]["samples"] == 32
    assert cli.main(["report", f"{src}:wrong", "--output", str(out)]) == 2
    assert "must return" in capsys.readouterr().err
    assert cli.main(["report", f"{src}:nothing", "--output", str(out)]) == 2
    assert cli.main(["report", "--output", str(out)]) == 2
    assert "either --demo or FILE.py:FUNC" in capsys.readouterr().err
    assert cli.main(["report", f"{src}:build", "--damage", "conv2"]) == 2
