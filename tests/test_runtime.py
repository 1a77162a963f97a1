"""`dcnbench runtime`: a tiny --scale run writes Table 4's CSVs; resume; the paper's numbers."""

import csv

from click.testing import CliRunner

from dcnbench.cli import main
from dcnbench.runtime import TABLE4_MODELS, overhead_rows, read_paper_table4

REQUIRED = ["model", "variant", "device", "net_forward_s", "runtime_s", "repeats"]
PROVENANCE = ["backend", "threads", "machine", "torch", "git_commit", "date"]


def read(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_tiny_scale_run_writes_csv_and_resumes(tmp_path):
    args = ["runtime", "--scale", "0.05", "--repeats", "2", "--model", "R-FCN",
            "--results-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    columns, rows = read(tmp_path / "table4_runtime_cpu.csv")
    assert columns[:6] == REQUIRED and set(PROVENANCE) <= set(columns)
    assert [(r["model"], r["variant"]) for r in rows] == [("R-FCN", "plain"), ("R-FCN", "deformable")]
    for r in rows:
        assert r["device"] == "cpu" and r["repeats"] == "2" and r["scale"] == "0.05"
        assert 0 < float(r["net_forward_s"]) <= float(r["runtime_s"])
        assert len(r["runtime_all_s"].split()) == 2
        assert r["git_commit"] and r["machine"] and r["backend"] in ("reference", "native")
    assert rows[0]["input_hw"] == "30x40" and rows[0]["raw_hw"] == "375x500" and rows[0]["proposals"] == "300"
    assert int(rows[1]["params"]) > int(rows[0]["params"])
    assert "R-FCN" in result.output and "1.182" in result.output  # the paper's R-FCN net-forward ratio

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("already measured") == 1
    assert read(tmp_path / "table4_runtime_cpu.csv")[1] == rows


def test_params_only(tmp_path):
    result = CliRunner().invoke(main, ["runtime", "--params-only", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    columns, rows = read(tmp_path / "table4_params.csv")
    assert columns == ["model", "variant", "params"]
    assert [(r["model"], r["variant"]) for r in rows] == [(s.name, v) for s in TABLE4_MODELS for v in ("plain", "deformable")]
    by = {(r["model"], r["variant"]): int(r["params"]) for r in rows}
    assert by["DeepLab@C", "plain"] == by["DeepLab@V", "plain"] == 44_619_861
    assert all(by[m, "deformable"] > by[m, "plain"] for m, _ in by)
    assert "46.0" in result.output and "59.9" in result.output  # paper's column


def test_paper_table4_transcription():
    paper = read_paper_table4()
    assert len(paper) == 10 and all(len(v) == 3 for v in paper.values())
    assert paper["Faster R-CNN", "deformable"] == {"params_M": 59.9, "net_forward_s": 0.192, "runtime_s": 0.234}
    assert paper["DeepLab@V", "plain"]["runtime_s"] == 0.094


def test_overhead_ratio():
    rows = [{"model": "R-FCN", "variant": "plain", "net_forward_s": "2.0", "runtime_s": "4.0"},
            {"model": "R-FCN", "variant": "deformable", "net_forward_s": "2.5", "runtime_s": "4.4"}]
    (rec,) = overhead_rows(rows)
    assert rec["ratio_net_forward_s"] == 1.25 and abs(rec["ratio_runtime_s"] - 1.1) < 1e-12
    assert abs(rec["paper_ratio_net_forward_s"] - 0.169 / 0.143) < 1e-12
