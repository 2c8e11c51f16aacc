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
    float_model, calib, _ = stages("conv2", 100.0)
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
    assert set(r["timing"]) >= {"compare", "stats", "sensitivity", "doctor", "keep_float",
                                "views", "total"}


def test_accuracy_is_percent_and_exact(damaged_report):
    _, r = damaged_report
    float_model, _, _ = stages()
    x, y = labelled()
    with torch.no_grad():
        correct = int((float_model.eval()(x).argmax(1) == y).sum())
    m = r["metrics"]
    assert m["unit"] == "%" and m["float"] == pytest.approx(100 * correct / len(y), abs=1e-9)
    assert m["float"] != round(m["float"], 2)  # exact in the JSON (97.111...), not rounded
    s = r["sensitivity"]
    assert s["reference"] == pytest.approx(m["float_same_weights"], abs=1e-9)
    for row in s["layers"]:
        assert row["drop"] == pytest.approx(s["reference"] - row["metric"], abs=1e-9)
    assert r["thresholds"]["min_drop"] == pytest.approx(1.0)  # 0.01 as points
    assert r["all_but_one"]["reference"] == pytest.approx(s["reference"], abs=1e-9)
    assert r["weights_activations"]["rows"][-1]["metric"] == pytest.approx(
        m["fake_quant"], abs=1e-9)
    assert any("points" in why for j in r["causes"] for why in j["reasons"])
    page = render_html(r)
    assert f"{m['fixed_point']:.2f} %" in page and repr(m["fixed_point"]) in page


def test_the_damage_is_real_harm_and_diagnosed(damaged_report):
    _, r = damaged_report
    m = r["metrics"]
    assert m["fixed_point"] < m["float"] - 20  # points: the damage shows in fixed point
    # weight-only vs activation-only: the activations (conv2's output scale) cost it
    wa = {row["key"]: row for row in r["weights_activations"]["rows"]}
    assert wa["float"]["drop"] == 0 and wa["weights"]["drop"] < 2
    assert wa["activations"]["drop"] > 20
    assert wa["weights"]["fake_quants"] + wa["activations"]["fake_quants"] == \
        wa["all"]["fake_quants"]
    # all but this layer: keeping conv2 in float recovers it, and the bisection stops there
    a = r["all_but_one"]
    assert a["layers"][0]["name"] == "conv2" and a["layers"][0]["recovery"] > 20
    assert a["fallback"] == ["conv2"] and len(a["steps"]) == 1
    assert a["steps"][0]["metric"] >= a["reference"] - a["tolerance"]
    assert a["steps"][0]["metric"] == a["layers"][0]["metric"]
    # the histograms show the wasted levels: conv2 uses a couple, conv1 most of its 128
    levels = {h["name"]: h["levels_used"] for h in r["histograms"]}
    assert levels["conv2"] <= 3 and levels["conv1"] > 60
    for h in r["histograms"]:
        assert sum(h["float"]) == sum(h["quantized"]) > 0
        assert len(h["edges"]) == len(h["float"]) + 1
    assert r["sensitivity"]["applied"]["after"] > r["sensitivity"]["applied"]["before"] + 20


def test_the_damaged_layer_is_found(damaged_report):
    _, r = damaged_report
    assert r["summary"]["worst_layer"] == "conv2"
    # against float, conv2 ranks first; calibrated -> fixed point differs only by the spec's
    # rounding (at most 1 LSB per layer), where conv2 has nothing particular to rank
    to_float = [c for c in r["comparisons"] if c["a"].startswith("float")]
    assert len(to_float) == 2 and all(c["ranking"][0] == "conv2" for c in to_float)
    (spec,) = [c for c in r["comparisons"] if not c["a"].startswith("float")]
    assert all((v["own_max_error_lsb"] or 0) <= 1 for v in spec["layers"])
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
                "sensitivity", "weights-activations", "keep-float", "weight-ranges",
                "histograms", "weight-drift", "quant-summary"):
        assert f'<section id="{sec}">' in page
    for kind in ("sqnr-depth", "cosine-depth", "error-histogram", "sensitivity-drop",
                 "sensitivity-sqnr", "weights-activations", "keep-float-recovery",
                 "weight-ranges", "value-histogram", "weight-drift"):
        assert f"data-plot='{kind}'" in page
    assert page.count("data-plot='error-histogram'") == 6
    assert page.count("data-plot='weight-ranges'") == 5  # conv1-4, fc
    # comparisons, stats, sensitivity, doctor, change log; weights vs activations, all but
    # one and its bisection, weight ranges, histograms, weight drift, layer summary
    assert page.count('<table class="data sortable"') == 3 + 1 + 1 + 1 + 1 + 7


def test_fixed_point_only_and_unlabelled_data(tmp_path):
    float_model, _, fixed = stages("conv2", 20.0)
    x, _ = labelled(200)
    r = write_report(tmp_path / "fp.html", float_model, fixed, example(), x)
    assert len(r["comparisons"]) == 1 and r["comparisons"][0]["a"] == "float"
    assert r["sensitivity"] is None and "converted" in r["sensitivity_skipped"]
    assert r["all_but_one"] is None and r["weights_activations"] is None
    assert r["weight_drift"] is None
    assert [w["weights"] for w in r["weight_ranges"]] == ["dequantized"] * 5
    assert {row["kind"] for row in r["quant_summary"]} >= {"conv2d", "linear", "quant_stub"}
    assert {h["name"] for h in r["histograms"]} >= {"conv1", "conv2", "fc"}
    assert r["metrics"]["name"] == "top-1 agreement with float"
    assert r["metrics"]["float"] == 100.0 and r["metrics"]["fake_quant"] is None
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
    assert line["float_fallback"] == ["conv2"] and line["int16_suggestion"][0] == "conv2"
    # the default damage (x100) costs the fixed-point model real accuracy
    assert line["metrics"]["fixed_point"] < line["metrics"]["float"] - 5
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["model"]["stage"] == "QAT" and len(r["monitor"]) == 1
    # the doctor names conv2 too, from the QAT model's observed ranges (no histogram there)
    qk105 = [f for f in r["doctor"]["findings"] if f["code"] == "QK105"]
    assert [f["module"] for f in qk105] == ["conv2"]
    assert "what its observed range needs" in qk105[0]["message"]
    assert re.search(r'href="[^"]*QK105\.md">QK105</a>', out.read_text())
    assert r["monitor_unit"] == "%" and r["monitor"][0]["fixed_point"] > 50
    # QAT moved the weights: the float-vs-QAT view sees it
    assert all(w["change"] > 0 for w in r["weight_drift"])
    assert any(w["levels_changed"] > 0 for w in r["weight_drift"])
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
