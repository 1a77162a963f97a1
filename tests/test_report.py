"""Reporting: the paper's numbers, tables beside ours, figures geometry, the regression gate."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from dcnbench.ops import use_backend
from dcnbench.report import check as gate
from dcnbench.report.figures import (
    DeformLevel,
    capture_deform_levels,
    capture_roi_offsets,
    plot_ablation,
    plot_figure5,
    plot_figure6,
    roi_bins,
    sampling_locations,
    save,
)
from dcnbench.report.paper import PAPER_DIR, load_paper_table
from dcnbench.report.tables import (
    MISSING,
    NA,
    build_layout,
    build_table4,
    format_rendered,
    render_layout,
    render_table,
)
from dcnbench.runner.experiment import expand_cells, load_experiment

PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared" / "paper" / "deformable-convnets-2017.md"


# ---------------------------------------------------------------------------------------------
# The paper's numbers
# ---------------------------------------------------------------------------------------------


def test_paper_spot_cells():
    """A few cells, as printed in the paper."""
    assert load_paper_table(1).get("res5a,b,c (3, default)", "R-FCN mAP@0.7") == 64.7
    assert load_paper_table(1).get("none (0, baseline)", "DeepLab mIoU@C") == 70.4
    assert load_paper_table(2).get("res5c", "large mean") == 8.4
    assert load_paper_table(2).get("res5a", "background std") == 1.1
    t3 = load_paper_table(3)
    assert t3.get("deformable convolution & RoI pooling", "R-FCN mAP@0.7") == 68.5
    assert t3.get("deformable RoI pooling", "DeepLab mIoU@V") is None  # N.A. in the paper
    t4 = load_paper_table(4)
    ours_rfcn = [r for r in t4.rows if "R-FCN" in r and "Ours" in r]
    assert len(ours_rfcn) == 1 and t4.get(ours_rfcn[0], next(c for c in t4.columns if "param" in c)) == 49.5
    assert load_paper_table(5).get("Ours: R-FCN, ResNet-101", "mAP@[0.5:0.95]") == 34.5
    assert load_paper_table(5).get("Ours: R-FCN, Aligned-Inception-ResNet, M, B", "mAP@[0.5:0.95]") == 37.5
    assert load_paper_table(7).get("Aligned-Inception-ResNet", "# params (M)") == 64.3
    assert load_paper_table(1).decimals("DeepLab mIoU@V") == 1 and load_paper_table(4).decimals(t4.columns[1]) == 3


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", re.sub(r"</?b>", "", line))]


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not beside this checkout")
@pytest.mark.parametrize("table,starts", [
    (1, ["none (0", "res5c (1)", "res5b,c (2)", "res5a,b,c (3", "res5 & res4b22"]),
    (2, ["res5c\t", "res5b\t", "res5a\t"]),
    (3, ["atrous convolution (2,2,2)", "atrous convolution (8,8,8)", "deformable convolution\t",
         "deformable RoI pooling\t", "deformable convolution & RoI pooling"]),
    (7, ["ResNet-101\t", "Inception-ResNet-v2\t", "Aligned-Inception-ResNet\t"]),
])
def test_paper_rows_match_the_text(table, starts):
    """Every number of these rows, in order, equals the paper's line for that row."""
    lines = PAPER_TEXT.read_text().splitlines()
    paper = load_paper_table(table)
    for start in starts:
        line = next(ln for ln in lines if ln.startswith(start) and _numbers(ln))
        row = next(r for r in paper.rows if start.strip().rstrip("\t") in r or r.startswith(start.strip()))
        ours = [paper.get(row, c) for c in paper.columns if paper.get(row, c) is not None]
        assert ours == _numbers(line), (table, row)


def test_paper_csvs_are_well_formed():
    for n in (1, 2, 3, 4, 5, 7):
        with (PAPER_DIR / f"table{n}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(r["table"] == str(n) for r in rows)
        assert len({(r["row"], r["column"]) for r in rows}) == len(rows)


# ---------------------------------------------------------------------------------------------
# Synthetic results CSVs
# ---------------------------------------------------------------------------------------------


def _write_results(path: Path, table: int, tier: str, values: dict, stale: int = 0) -> None:
    """values: (task, variant) -> {metric: [per-seed values]} for cells of the current configs."""
    spec = load_experiment(table)
    hashes = {(c.task, c.variant): c.config_hash for c in expand_cells(spec, tier)}
    metrics = sorted({m for v in values.values() for m in v} | ({"miou"} if stale else set()))
    cols = ["table", "tier", "task", "variant", "seed", *metrics, "wall_s", "config_hash"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for (task, variant), by_metric in values.items():
            n = max(len(v) for v in by_metric.values())
            for seed in range(n):
                row = {"table": table, "tier": tier, "task": task, "variant": variant, "seed": seed, "wall_s": 1.0,
                       "config_hash": hashes[(task, variant)]}
                row.update({m: vals[seed] for m, vals in by_metric.items() if seed < len(vals)})
                w.writerow(row)
        for i in range(stale):  # rows of an older config: ignored
            w.writerow({"table": table, "tier": tier, "task": "deeplab", "variant": "none", "seed": 90 + i,
                        "miou": 99.0, "wall_s": 1.0, "config_hash": "000000000000"})


T1 = {
    ("deeplab", "none"): {"miou": [50.0, 52.0, 54.0]},
    ("deeplab", "res5c"): {"miou": [55.0, 56.0, 57.0]},
    ("deeplab", "res5a-c"): {"miou": [60.0, 61.0, 62.0]},
    ("rfcn", "none"): {"map50": [30.0, 31.0, 32.0], "map70": [10.0, 11.0, 12.0]},
    ("rfcn", "res5a-c"): {"map50": [33.0], "map70": [11.5]},
}


def test_table1_places_ours_beside_the_paper(tmp_path):
    path = tmp_path / "table1_cpu.csv"
    _write_results(path, 1, "cpu", T1, stale=2)
    layout = build_layout(1, "cpu", path)
    s = layout.ours[("res5a,b,c (3, default)", "DeepLab mIoU@V")]
    assert (s.mean, s.std, s.n) == (61.0, 1.0, 3)  # the stale 99.0 rows are not mixed in
    r = render_layout(layout, "cpu")
    rows = dict(r.rows)
    col = {h: i for i, h in enumerate(r.header)}
    cells = rows["res5a,b,c (3, default)"]
    # paper value with its difference to the paper's baseline; ours with difference ± SE
    assert cells[col[("DeepLab mIoU@V", "paper")]] == "75.2 (+5.5)"
    se = math.sqrt(1.0**2 / 3 + 2.0**2 / 3)
    assert cells[col[("DeepLab mIoU@V", "ours")]] == f"61.0 ± 1.0 (+9.0 ± {se:.1f})"
    assert rows["none (0, baseline)"][col[("DeepLab mIoU@V", "ours")]] == "52.0 ± 2.0"
    # one seed: no spread, a difference without SE
    assert cells[col[("R-FCN mAP@0.7", "ours")]] == "11.5 (+0.5)"
    # defined but not run: missing, never filled; mIoU@C is not ours: N.A.
    assert rows["res5b,c (2)"][col[("DeepLab mIoU@V", "ours")]] == MISSING
    assert rows["res5b,c (2)"][col[("class-aware RPN mAP@0.5", "ours")]] == MISSING
    assert cells[col[("DeepLab mIoU@C", "ours")]] == NA
    notes = " ".join(r.footnotes)
    assert "n = 1–3" in notes and "13 of 15 rows" in notes


def test_table3_not_applicable_and_missing(tmp_path):
    path = tmp_path / "t3.csv"
    _write_results(path, 3, "cpu", {("faster", "atrous-2"): {"map70": [20.0, 21.0]}})
    r = render_table(3, "cpu", path)
    rows = dict(r.rows)
    col = {h: i for i, h in enumerate(r.header)}
    assert rows["deformable RoI pooling"][col[("DeepLab mIoU@V", "paper")]] == NA
    assert rows["deformable RoI pooling"][col[("DeepLab mIoU@V", "ours")]] == NA  # not defined for DeepLab
    assert rows["deformable RoI pooling"][col[("Faster R-CNN mAP@0.7", "ours")]] == MISSING
    assert rows["atrous convolution (2,2,2) (default)"][col[("Faster R-CNN mAP@0.7", "ours")]] == "20.5 ± 0.7"


def test_table2_effective_dilation(tmp_path):
    path = tmp_path / "t2.csv"
    _write_results(path, 2, "cpu", {("rfcn", "res5a-c"): {"effdil_res5c_large_mean": [3.0, 3.2],
                                                          "effdil_res5c_large_std": [1.0, 1.0]}})
    r = render_table(2, "cpu", path)
    rows = dict(r.rows)
    col = {h: i for i, h in enumerate(r.header)}
    assert rows["res5c"][col[("large mean", "ours")]] == "3.1 ± 0.1"
    assert rows["res5c"][col[("large mean", "paper")]] == "8.4"
    assert rows["res5a"][col[("small mean", "ours")]] == MISSING


@pytest.mark.parametrize("fmt", ["console", "markdown", "latex", "csv"])
def test_every_format(tmp_path, fmt):
    path = tmp_path / "table1_cpu.csv"
    _write_results(path, 1, "cpu", T1)
    text = format_rendered(render_table(1, "cpu", path), fmt)
    if fmt == "csv":
        frame = pd.read_csv(__import__("io").StringIO(text))
        cell = frame[(frame.row == "res5a,b,c (3, default)") & (frame.column == "DeepLab mIoU@V")].iloc[0]
        assert (cell.paper, cell.ours_mean, cell.ours_delta, cell.paper_delta) == (75.2, 61.0, 9.0, 5.5)
        assert (frame.ours_status == MISSING).sum() > 0
        assert frame[(frame.row == "res5b,c (2)") & (frame.column == "DeepLab mIoU@V")].ours_mean.isna().all()
    elif fmt == "markdown":
        assert "| res5a,b,c (3, default) | 75.2 (+5.5) | 61.0 ± 1.0 (+9.0 ± 1.3) |" in text
        assert MISSING in text
    elif fmt == "latex":
        assert r"\begin{tabular}" in text and r"61.0 $\pm$ 1.0" in text and r"\multicolumn{2}{c}{DeepLab mIoU@V}" in text
    else:
        assert "61.0 ± 1.0" in text and MISSING in text


def test_paper_only_tables_and_table4(tmp_path):
    r7 = render_table(7, "cpu")
    assert [h[1] for h in r7.header] == ["paper"] * 3 and "not reproduced" in r7.footnotes[0]
    (tmp_path / "table4_params.csv").write_text("model,variant,params\nR-FCN,plain,1000000\nR-FCN,deformable,1100000\n")
    (tmp_path / "table4_runtime_cpu.csv").write_text(
        "model,variant,device,net_forward_s,runtime_s,repeats\nR-FCN,plain,cpu,0.2,0.3,5\nR-FCN,deformable,cpu,0.25,0.33,5\n")
    r4 = build_table4(tmp_path)
    rows = dict(r4.rows)
    ours_row = next(k for k in rows if "R-FCN" in k and "Ours" in k)
    col = {h: i for i, h in enumerate(r4.header)}
    params = next(h for h in r4.header if "param" in h[0] and "ours" in h[1])
    fwd = next(h for h in r4.header if "forward" in h[0] and "ours" in h[1])
    fwd_paper = next(h for h in r4.header if "forward" in h[0] and h[1] == "paper")
    assert rows[ours_row][col[params]] == "1.100 (×1.100)"
    assert rows[ours_row][col[fwd]] == "0.2500 (×1.250)"
    assert rows[ours_row][col[fwd_paper]] == "0.169 (×1.182)"
    assert rows["Faster R-CNN"][col[params]] == MISSING
    assert gate.check_table4(tmp_path).ok
    (tmp_path / "table4_params.csv").write_text("model,variant,params\nVGG,plain,1\n")
    (tmp_path / "table4_runtime_cpu.csv").unlink()
    assert "matches a row" in gate.check_table4(tmp_path).text()


def test_table_cli_writes_markdown(tmp_path):
    from dcnbench.cli import main

    path = tmp_path / "table1_cpu.csv"
    _write_results(path, 1, "cpu", T1)
    result = CliRunner().invoke(main, ["table", "1", "--format", "csv", "--results", str(path), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "61.0 ± 1.0" in (tmp_path / "table1_cpu.md").read_text()


def test_table_cli_results_must_exist(tmp_path):
    from dcnbench.cli import main

    result = CliRunner().invoke(main, ["table", "3", "--tier", "smoke", "--results", str(tmp_path / "none.csv")])
    assert result.exit_code == 2 and "Invalid value for '--results'" in result.output
    assert "does not exist" in result.output


def test_table_cli_figures_go_to_out(tmp_path):
    from dcnbench.cli import main

    path = tmp_path / "table1_smoke.csv"
    _write_results(path, 1, "smoke", T1)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["table", "1", "--tier", "smoke", "--format", "csv", "--results", str(path),
                                       "--figures", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["table1_smoke.md", "table1_smoke.pdf", "table1_smoke.png"]
    result = CliRunner().invoke(main, ["table", "4", "--figures", "--out", str(tmp_path / "t4")])
    assert result.exit_code == 2 and "Table 4 has none" in result.output  # it did nothing, silently


def test_figures_cli_reads_an_ablate_out_folder(tmp_path):
    from dcnbench.cli import main

    _write_results(tmp_path / "ablate" / "table1_smoke.csv", 1, "smoke", T1)
    args = ["figures", "--tier", "smoke", "--table", "1", "--table", "2", "--results-dir", str(tmp_path / "ablate"),
            "--out", str(tmp_path / "figs")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["table1_smoke.pdf", "table1_smoke.png"]
    assert f"table 2: no smoke-tier results in {tmp_path / 'ablate' / 'table2_smoke.csv'}" in result.output
    assert "figure5: no checkpoint found" in result.output  # looked under the folder's checkpoints/ only


# ---------------------------------------------------------------------------------------------
# The regression gate
# ---------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_reference_passes_identical_and_fails_readably(tmp_path):
    multi = tmp_path / "multi.csv"
    _write_results(multi, 1, "smoke", {("deeplab", "none"): {"miou": [10.0, 12.0, 14.0]},
                                       ("deeplab", "res5c"): {"miou": [20.0, 21.0, 22.0]},
                                       ("rpn", "res5c"): {"map50": [20.0, 20.0, 20.0]}})
    ref = gate.reference_rows(1, _rows(multi), k=3, floor_abs=0.1, floor_rel=0.0)
    by = {(r["task"], r["variant"]): r for r in ref}
    # own std 2 -> 6; own std 1 but DeepLab mIoU's pooled std sqrt((4 + 1) / 2) -> 3 * 1.58; no spread -> floor
    assert float(by[("deeplab", "none")]["tolerance"]) == pytest.approx(6.0)
    assert float(by[("deeplab", "res5c")]["tolerance"]) == pytest.approx(3 * math.sqrt(2.5), rel=1e-4)
    assert float(by[("rpn", "res5c")]["tolerance"]) == pytest.approx(0.1)
    assert not any(r["metric"] == "wall_s" for r in ref)
    gate.write_reference(tmp_path / "ref", 1, ref)
    ref = gate.read_reference(tmp_path / "ref", 1)
    # recomputing from the stored seed values gives the same reference
    again = gate.rederive_reference(tmp_path / "ref", 1, k=3, floor_abs=0.1, floor_rel=0.0)
    assert [{k: str(v) for k, v in r.items()} for r in again] == ref
    # the same numbers: pass (seed 0 of each cell)
    assert gate.compare_to_reference(1, ref, _rows(multi)).ok
    # a number moves out of its tolerance: fail, with cell, expected ± tolerance and got
    moved = tmp_path / "moved.csv"
    cells = {("deeplab", "none"): {"miou": [10.0]}, ("deeplab", "res5c"): {"miou": [20.0]}}
    _write_results(moved, 1, "smoke", {**cells, ("rpn", "res5c"): {"map50": [20.5]}})
    report = gate.compare_to_reference(1, ref, _rows(moved))
    assert not report.ok and len(report.problems) == 1
    text = report.text()
    assert "table 1 smoke rpn/res5c map50" in text and "20 ± 0.1" in text and "20.5" in text
    # within tolerance of the spread: pass
    _write_results(moved, 1, "smoke", {("deeplab", "none"): {"miou": [17.0]}, ("deeplab", "res5c"): {"miou": [25.0]},
                                       ("rpn", "res5c"): {"map50": [20.05]}})
    assert gate.compare_to_reference(1, ref, _rows(moved)).ok
    # a cell that produced nothing, or a changed config: fail
    _write_results(moved, 1, "smoke", cells)
    assert "missing" in gate.compare_to_reference(1, ref, _rows(moved)).text()
    stale = [dict(r, config_hash="ffffffffffff") for r in _rows(multi)]
    assert "config changed" in gate.compare_to_reference(1, ref, stale).text()


def test_check_smoke_without_reference_fails(tmp_path):
    report = gate.check_smoke(directory=tmp_path)
    assert not report.ok and "--update-reference" in report.text()


FINDINGS = """
[[finding]]
id = "deeplab"
text = "res5a-c beats none on DeepLab mIoU by > 2 SE"
table = 1
tier = "cpu"
task = "deeplab"
metric = "miou"
a = "res5a-c"
b = "none"
min_se = 2.0

[[finding]]
id = "rfcn"
text = "res5a-c beats none on R-FCN mAP@0.5 by > 2 SE"
table = 1
tier = "cpu"
task = "rfcn"
metric = "map50"
a = "res5a-c"
b = "none"
min_se = 2.0

[[finding]]
id = "t2"
text = "no table 2 yet"
table = 2
tier = "cpu"
task = "rfcn"
metric = "effdil_res5c_large_mean"
metric_b = "effdil_res5c_small_mean"
a = "res5a-c"
b = "res5a-c"
min_se = 0.0
"""


def test_findings_recorded_then_checked(tmp_path):
    root, findings = tmp_path / "ablate", tmp_path / "findings.toml"
    findings.write_text(FINDINGS)
    values = {("deeplab", "none"): {"miou": [50.0, 52.0, 54.0]}, ("deeplab", "res5a-c"): {"miou": [60.0, 61.0, 62.0]},
              ("rfcn", "none"): {"map50": [30.0, 31.0, 32.0]}, ("rfcn", "res5a-c"): {"map50": [33.0]}}
    _write_results(root / "table1_cpu.csv", 1, "cpu", values)
    # unrecorded verdicts on a present CSV fail
    assert "--record-findings" in gate.check_findings(findings, root).text()
    recorded = {f.id: f for f in gate.record_findings(findings, root)}
    assert recorded["deeplab"].holds is True and "SE" in recorded["deeplab"].measured
    assert recorded["rfcn"].holds is None  # one seed of res5a-c: SE undefined, not decided
    assert recorded["t2"].holds is None  # no table2_cpu.csv
    # a cell not yet decidable (partial sweep, one seed) is reported as a note, not a failure
    report = gate.check_findings(findings, root)
    assert report.ok, report.text()
    assert any("finding rfcn: undecidable" in n for n in report.notes)
    # an honest "does not hold" is a valid record
    values[("rfcn", "res5a-c")] = {"map50": [30.0, 31.5, 31.0]}
    _write_results(root / "table1_cpu.csv", 1, "cpu", values)
    recorded = {f.id: f for f in gate.record_findings(findings, root)}
    assert recorded["rfcn"].holds is False
    report = gate.check_findings(findings, root)
    assert report.ok, report.text()
    assert any("t2" in n for n in report.notes)
    # the numbers move: the recorded verdict no longer matches
    values[("deeplab", "res5a-c")] = {"miou": [52.0, 53.0, 51.0]}
    _write_results(root / "table1_cpu.csv", 1, "cpu", values)
    report = gate.check_findings(findings, root)
    assert not report.ok
    text = report.text()
    assert "finding deeplab" in text and "holds" in text and "does not hold" in text


def test_cpu_csvs_parse_render_and_are_current(tmp_path):
    root = tmp_path / "ablate"
    _write_results(root / "table1_cpu.csv", 1, "cpu", T1)
    report = gate.check_cpu_csvs(tables=(1, 2), root=root)
    assert report.ok and "table1_cpu.csv renders" in report.passed
    _write_results(root / "table1_cpu.csv", 1, "cpu", {}, stale=2)  # only rows of an old config
    assert "stale" in gate.check_cpu_csvs(tables=(1,), root=root).text()
    (root / "table1_cpu.csv").write_text("table,tier,task,variant,seed,miou,config_hash\n1,cpu,deeplab,none,0,abc,x\n")
    assert "not a number" in gate.check_cpu_csvs(tables=(1,), root=root).text()


def test_committed_findings_file_parses():
    findings = gate.load_findings()
    assert findings and all(f.table in (1, 2, 3) and f.tier == "cpu" for f in findings)
    for f in findings:
        spec = load_experiment(f.table)
        names = {v["name"] for v in spec["variants"]}
        assert {f.a, f.b} <= names and f.task in spec["tasks"], f.id


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _level(offset, size=16, dilation=1):
    return DeformLevel(offset, (3, 3), (1, 1), (dilation, dilation), (dilation, dilation), (size, size), (size, size))


def test_sampling_locations_regular_and_shifted():
    zero = np.zeros((18, 16, 16))
    pts = sampling_locations([_level(zero)] * 3, (8, 8))
    assert pts.shape == (729, 2)
    assert {tuple(p) for p in pts.astype(int)} == {(y, x) for y in range(5, 12) for x in range(5, 12)}
    dil = sampling_locations([_level(zero, dilation=2)] * 3, (8, 8))
    assert dil[:, 0].min() == 2 and dil[:, 0].max() == 14  # 8 ± 3 layers × 2
    shifted = zero.copy()
    shifted[0::2] = 0.5  # dy = 0.5 at every tap and unit
    pts2 = sampling_locations([_level(shifted)] * 3, (8, 8))
    np.testing.assert_allclose(pts2[:, 0], pts[:, 0] + 1.5)
    np.testing.assert_allclose(pts2[:, 1], pts[:, 1])
    # onto a 2x larger image: cell i of the stride-2 map is pixel 2i (its receptive field's centre)
    img = sampling_locations([_level(zero)], (8, 8), image_size=(32, 32))
    np.testing.assert_allclose(sorted(set(img[:, 0])), [14, 16, 18])


def test_capture_deform_levels_and_figure5(tmp_path):
    from dcnbench.ops import DeformConv2d

    layers = [DeformConv2d(2, 2, 3, padding=2, dilation=2) for _ in range(3)]
    with torch.no_grad():
        layers[-1].offset_conv.bias[1::2] = 1.0  # the top layer shifts every tap by dx = +1
    model = torch.nn.Sequential(*layers)
    with use_backend("reference"):  # geometry only: no need to build the native kernels here
        levels = capture_deform_levels(model, torch.rand(1, 2, 12, 12))
    assert len(levels) == 3 and levels[0].offset.shape == (18, 12, 12)
    pts = sampling_locations(levels, (6, 6), (12, 12))
    assert pts.shape == (729, 2) and pts[:, 1].mean() == pytest.approx(7.0, abs=1e-4)
    assert pts[:, 0].mean() == pytest.approx(6.0, abs=1e-4)
    fig = plot_figure5([{"image": np.zeros((12, 12, 3)), "points": pts, "unit": (6, 6), "label": "background"}])
    paths = save(fig, tmp_path, "figure5")
    assert all(p.stat().st_size > 0 for p in paths) and {p.suffix for p in paths} == {".png", ".pdf"}


def test_roi_bins_and_figure6(tmp_path):
    from dcnbench.ops import DeformRoIPool

    regular, moved = roi_bins((10, 20, 40, 50), None)
    np.testing.assert_allclose(regular, moved)
    off = np.zeros((2, 3, 3))
    off[0, 1, 2] = 1.0  # bin (1, 2) moves right by gamma * roi_w
    regular, moved = roi_bins((10, 20, 40, 50), off, gamma=0.1)
    assert regular[0, 0].tolist() == [10, 20, 10, 10] and regular[2, 2].tolist() == [30, 40, 10, 10]
    assert moved[1, 2, 0] == pytest.approx(regular[1, 2, 0] + 3.0) and moved[0, 0].tolist() == regular[0, 0].tolist()

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = DeformRoIPool(4, output_size=3, spatial_scale=0.5)
            with torch.no_grad():
                self.pool.offset_fc.bias.copy_(torch.arange(18.0) / 10)

        def forward(self, x):
            return self.pool(x, torch.tensor([[0.0, 0, 0, 8, 8]]))

    with use_backend("reference"):
        offsets, gamma, name = capture_roi_offsets(Head(), torch.rand(1, 4, 8, 8), np.array([[2.0, 2, 10, 12]]))
    assert name == "pool" and gamma == 0.1 and offsets.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(offsets[0].ravel(), np.arange(18) / 10, atol=1e-6)
    regular, moved = roi_bins((2, 2, 10, 12), offsets[0], gamma)
    fig = plot_figure6([{"image": np.zeros((16, 16, 3)), "roi": (2, 2, 10, 12), "regular": regular, "moved": moved}])
    assert all(p.is_file() for p in save(fig, tmp_path, "figure6"))


def test_ablation_plot(tmp_path):
    path = tmp_path / "t1.csv"
    _write_results(path, 1, "cpu", T1)
    fig = plot_ablation(build_layout(1, "cpu", path), "cpu")
    assert fig is not None and len([a for a in fig.axes if a.get_title()]) == 3  # DeepLab, R-FCN @0.5, @0.7
    assert all(p.is_file() for p in save(fig, tmp_path, "table1_cpu"))
    assert plot_ablation(build_layout(1, "cpu", tmp_path / "none.csv"), "cpu") is None


def test_check_cli_end_to_end_with_stubbed_smoke(tmp_path, monkeypatch):
    """`dcnbench check`: exit 0 on the reference's own numbers, 1 with a readable diff when one moves."""
    import dcnbench.report.tables as tables_mod
    from dcnbench.cli import main

    monkeypatch.setattr(tables_mod, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(gate, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(gate, "FINDINGS_PATH", tmp_path / "ablate" / "findings.toml")
    monkeypatch.setattr(gate, "REFERENCE_DIR", tmp_path / "reference")
    multi = tmp_path / "multi.csv"
    _write_results(multi, 1, "smoke", {("deeplab", "none"): {"miou": [10.0, 11.0, 12.0]},
                                       ("rpn", "none"): {"map50": [1.0, 1.5, 2.0]}})
    runs = {"rows": _rows(multi)}
    monkeypatch.setattr(gate, "_run_smoke", lambda table, seeds, jobs, out: (
        [r for r in runs["rows"] if int(r["seed"]) < seeds], []))
    result = CliRunner().invoke(main, ["check", "--update-reference", "--table", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reference" / "table1.csv").is_file() and (tmp_path / "reference" / "reference.json").is_file()
    # measuring another table later keeps table 1 in the reference
    gate.update_reference((2,), seeds=3, directory=tmp_path / "reference")
    meta = __import__("json").loads((tmp_path / "reference" / "reference.json").read_text())
    assert meta["tables"] == [1, 2] and set(meta["measured"]) == {"1", "2"} and meta["measured"]["1"]["seeds"] == 3
    (tmp_path / "reference" / "table2.csv").unlink()
    meta["tables"] = [1]
    (tmp_path / "reference" / "reference.json").write_text(__import__("json").dumps(meta))
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0, result.output
    assert "2 checks passed, 0 failed" in result.output
    moved = tmp_path / "moved.csv"
    _write_results(moved, 1, "smoke", {("deeplab", "none"): {"miou": [25.0]}, ("rpn", "none"): {"map50": [1.0]}})
    runs["rows"] = _rows(moved)
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 1
    assert "table 1 smoke deeplab/none miou" in result.output and "11 ± 4" in result.output and "25" in result.output
