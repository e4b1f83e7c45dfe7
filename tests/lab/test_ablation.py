"""The Fig. 6 ablation's tables (lab/ablation.py): written between markers, re-tabulated from saved runs, power."""

import json

from lab import ablation
from lab.protocol import ABLATION


def test_ablation_table_is_written_between_markers(tmp_path):
    row = {"colour_r_precision": 0.5, "geometry_r_precision": 0.25, "shape_score": 0.6, "shape_margin": -0.1}
    text = ablation.table({"base": row, "+textureless": {**row, "geometry_se": 0.125}},
                          {"+textureless": {"mean": 0.125, "se": 0.0625, "n": 4}},
                          {"+textureless": {"mean": -0.25, "se": None, "n": 1}})
    assert "| base | 0.50 | 0.25 |  | 0.60 |  | -0.10 |" in text
    assert "| +textureless | 0.50 | 0.25 ± 0.12 | +0.12 ± 0.06 | 0.60 | -0.25 | -0.10 |" in text
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\nother\n")
    ablation.write_benchmarks(text, doc)
    ablation.write_benchmarks(text.replace("0.50", "0.75"), doc)  # a second run replaces the first table
    out = doc.read_text()
    assert out.count(ablation.START) == 1 and "0.75" in out and "0.50" not in out and "other" in out


def test_ablation_table_from_saved_runs(tmp_path, capsys):
    """--from-json re-tabulates an --out file: rows in the ablation's order, steps paired by prompt and seed."""
    def run(row, seed, geo, shape):
        return {"row": row, "prompt": "a red cube", "seed": seed, "colour_r_precision": 1.0, "geometry_r_precision": geo,
                "shape_score": shape, "shape_margin": 0.0, "its_per_s": 10.0, "wall_s": 1.0}

    runs = [run("+view aug", 0, 0.5, 0.5), run("base", 0, 0.25, 0.25), run("base", 1, 0.5, 0.75),
            run("+view aug", 1, 1.0, 0.5)]
    saved = tmp_path / "ablation.json"
    saved.write_text(json.dumps({"runs": runs, "note": "Command: `python -m lab.ablation --seeds 2`"}))
    results = ablation.main(["--from-json", str(saved)])
    assert list(results) == ["base", "+view aug"] and results["+view aug"]["geometry_r_precision"] == 0.75
    out = capsys.readouterr().out
    # geometry +0.25 and +0.5 (mean +0.38 ± 0.12), shape +0.25 and -0.25 (mean +0.00 ± 0.25)
    assert "| +view aug | 1.00 | 0.75 ± 0.25 | +0.38 ± 0.12 | 0.50 | +0.00 ± 0.25 | +0.00 |" in out
    assert "--seeds 2" in out and "re-tabulated" in out

    # one file per row (as a long ablation is run, row by row) gives the same table; a run saved twice counts once
    first, second = tmp_path / "row1.json", tmp_path / "row2.json"
    first.write_text(json.dumps({"runs": [r for r in runs if r["row"] == "base"], "note": "row one"}))
    second.write_text(json.dumps({"runs": [r for r in runs if r["row"] == "+view aug"] + [runs[1]], "note": "row two"}))
    assert ablation.main(["--from-json", str(first), str(second)]) == results
    assert "row one row two" in capsys.readouterr().out
    ablation.main(["--from-json", str(first), str(second), "--note", "both rows, 2000 steps"])
    out = capsys.readouterr().out
    assert "both rows, 2000 steps" in out and "row one" not in out


def test_power_table_reads_the_pairs_off_saved_runs():
    rows = [{"row": row, "prompt": "x", "seed": s, "geometry_r_precision": g}
            for row, gs in (("base", (0.2, 0.4, 0.6)), ("+view aug", (0.3, 0.4, 0.9))) for s, g in enumerate(gs)]
    text = ablation.power_table(rows, list(ABLATION))
    # diffs +0.1, 0.0, +0.3: mean 0.133, sd 0.153, so (2 * 0.153 / 0.133)^2 = 5.3 -> 6 pairs
    assert "| +view aug | 3 | +0.133 | 0.153 | 0.088 | 6 |" in text, text
