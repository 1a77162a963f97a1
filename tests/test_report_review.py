"""Reporting, reviewed: the paper's Tables 4 and 5 against its text, results CSVs that cannot stand
for the table asked (refused with the reason, never averaged or shown as all-missing), and the gate
failing (not crashing, not passing) on a committed CSV that lost a cell or does not parse."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dcnbench.report import check as gate
from dcnbench.report.paper import load_paper_table
from dcnbench.report.tables import RESULTS_DIR, load_ours, render_table

from test_report import PAPER_TEXT, T1, _numbers, _write_results


def _text_block(first: str, caption: str) -> list[str]:
    """The paper text's table rows: the lines after the header ``first`` up to its caption."""
    lines = [re.sub(r"</?b>", "", ln) for ln in PAPER_TEXT.read_text().splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(caption))
    return [ln for ln in lines[start + 1:end] if _numbers(ln)]  # the header line is not a row


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not beside this checkout")
@pytest.mark.parametrize("table,first,caption", [(4, "method\t# params", "Table 4:"),
                                                 (5, "method\tbackbone", "Table 5:")])
def test_paper_tables_4_and_5_match_the_text_row_by_row(table, first, caption):
    """Each of the table's rows, in the paper's order, holds exactly the numbers of the text's line,
    in column order (Table 4: M params, net forward s, runtime s; "Ours" rows after their plain row)."""
    paper = load_paper_table(table)
    lines = _text_block(first, caption)
    assert len(lines) == len(paper.rows)
    for row, line in zip(paper.rows, lines):
        label = line.split("\t")[0]
        assert (label == "Ours") == (row.startswith("Ours") or row.endswith(", Ours")), (row, line)
        assert label == "Ours" or label.replace("Faster RCNN", "Faster R-CNN") in row, (row, line)
        assert [paper.get(row, c) for c in paper.columns if paper.get(row, c) is not None] == _numbers(line), row


def test_table_refuses_a_results_csv_of_another_table_or_tier(tmp_path):
    """Table 3's CSV given to Table 1 (or a cpu CSV to the smoke tier) is an error naming what it
    holds, not a table of 'missing' cells."""
    t3 = tmp_path / "table3_cpu.csv"
    _write_results(t3, 3, "cpu", {("deeplab", "atrous-2"): {"miou": [20.0, 21.0]}})
    with pytest.raises(ValueError, match="table/tier 3/cpu, expected 1/cpu"):
        render_table(1, "cpu", t3)
    t1 = tmp_path / "table1_cpu.csv"
    _write_results(t1, 1, "cpu", T1)
    with pytest.raises(ValueError, match="table/tier 1/cpu, expected 1/smoke"):
        render_table(1, "smoke", t1)
    from dcnbench.cli import main

    result = CliRunner().invoke(main, ["table", "1", "--results", str(t3), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "expected 1/cpu" in result.output


def test_table_refuses_runs_counted_twice(tmp_path):
    """A run appearing twice (e.g. two CSVs concatenated) would halve the seed SE; it is refused."""
    path = tmp_path / "table1_cpu.csv"
    _write_results(path, 1, "cpu", T1)
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows + rows[1:3]) + "\n")
    with pytest.raises(ValueError, match="duplicate run"):
        load_ours(1, "cpu", path)


def test_table_names_what_is_wrong_with_a_malformed_csv(tmp_path):
    """Not a results CSV, a line with an extra field, a metric that is not a number: ValueError with
    the line, not a KeyError / TypeError."""
    params = tmp_path / "params.csv"
    params.write_text("model,variant,params\nR-FCN,plain,1\n")
    with pytest.raises(ValueError, match="lacks column"):
        load_ours(1, "cpu", params)
    path = tmp_path / "table1_cpu.csv"
    _write_results(path, 1, "cpu", T1)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1] + ",extra", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="line 2: 1 more field"):
        load_ours(1, "cpu", path)
    path.write_text("\n".join([lines[0], lines[1].replace("50.0", "n/a"), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="'n/a' is not a number"):
        load_ours(1, "cpu", path)
    path.write_text("\n".join([*lines, "1,cpu,deeplab"]) + "\n")  # a truncated last line
    with pytest.raises(ValueError, match=f"line {len(lines) + 1}: .* field\\(s\\) fewer than the header"):
        load_ours(1, "cpu", path)
    path.write_text("hello world\n")  # a header and no rows
    with pytest.raises(ValueError, match="it has no rows"):
        load_ours(1, "cpu", path)
    path.write_bytes(b"\xff\xfe binary")  # not text (a UnicodeDecodeError traceback before)
    with pytest.raises(ValueError, match="is not a readable CSV"):
        load_ours(1, "cpu", path)


def test_gate_reports_a_malformed_committed_csv_instead_of_crashing(tmp_path):
    """A ragged line in a committed CSV is a failed check with its line number (it crashed the gate)."""
    root = tmp_path / "ablate"
    _write_results(root / "table1_cpu.csv", 1, "cpu", T1)
    lines = (root / "table1_cpu.csv").read_text().splitlines()
    (root / "table1_cpu.csv").write_text("\n".join([lines[0], lines[1] + ",extra", *lines[2:]]) + "\n")
    report = gate.check_cpu_csvs(tables=(1,), root=root)
    assert not report.ok and "line 2: 1 more field(s) than the header" in report.text()
    findings = tmp_path / "findings.toml"
    findings.write_text('[[finding]]\nid = "x"\ntext = "t"\ntable = 1\ntier = "cpu"\ntask = "deeplab"\n'
                        'metric = "miou"\na = "res5a-c"\nb = "none"\nholds = true\n')
    report = gate.check_findings(findings, root)
    assert not report.ok and "unusable CSV" in report.text()


def test_gate_fails_when_a_committed_cell_has_only_stale_runs(tmp_path):
    """One cell's config changed under its committed runs: the table now shows it 'missing', so the
    gate fails and names the cell (it passed with a note while other cells were current)."""
    root = tmp_path / "ablate"
    path = root / "table1_cpu.csv"
    _write_results(path, 1, "cpu", T1)
    assert gate.check_cpu_csvs(tables=(1,), root=root).ok
    rows = list(csv.DictReader(path.open(newline="")))
    for r in rows:
        if (r["task"], r["variant"]) == ("deeplab", "res5c"):
            r["config_hash"] = "0123456789ab"  # as if experiments/table1.toml's res5c had changed
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    report = gate.check_cpu_csvs(tables=(1,), root=root)
    assert not report.ok
    assert "1 cell(s) all stale" in report.text() and "deeplab/res5c" in report.text()


def test_gate_fails_on_a_committed_table_not_rendered_from_the_committed_csv(tmp_path):
    """tables/table1_cpu.md must be what `dcnbench table 1` renders now: current passes, an older
    rendering (a CSV rerun without re-rendering) fails and says how to fix it."""
    from dcnbench.report.tables import to_markdown

    _write_results(tmp_path / "ablate" / "table1_cpu.csv", 1, "cpu", T1)
    markdown = tmp_path / "tables" / "table1_cpu.md"
    markdown.parent.mkdir()
    markdown.write_text(to_markdown(render_table(1, "cpu", tmp_path / "ablate" / "table1_cpu.csv")))
    report = gate.check_markdown(tmp_path)
    assert report.ok and "tables/table1_cpu.md is current" in report.passed
    markdown.write_text(markdown.read_text().replace("0", "9"))  # other numbers
    report = gate.check_markdown(tmp_path)
    assert not report.ok and "re-render it: dcnbench table 1" in report.text()


def test_committed_tables_are_rendered_from_the_committed_csvs():
    assert gate.check_markdown().ok, gate.check_markdown().text()


def test_gate_fails_when_it_would_check_nothing(tmp_path):
    """An empty reference CSV, a reference of no tables, a missing findings.toml beside committed
    cpu-tier CSVs, and a gate that ran no check at all each fail (each passed with "0 checks")."""
    import json

    assert not gate.compare_to_reference(1, [], []).ok
    (tmp_path / "reference.json").write_text(json.dumps({"tables": []}))
    assert "referenced tables" in gate.check_smoke(directory=tmp_path).text()
    root = tmp_path / "ablate"
    _write_results(root / "table1_cpu.csv", 1, "cpu", T1)
    report = gate.check_findings(tmp_path / "findings.toml", root)
    assert not report.ok and "table1_cpu.csv" in report.text()
    empty = tmp_path / "empty" / "ablate"
    empty.mkdir(parents=True)
    report = gate.run_check(smoke=False, findings_path=tmp_path / "none.toml", results_root=empty)
    assert not report.ok and "none ran" in report.text()


def test_gate_says_how_many_smoke_bands_a_model_that_learned_nothing_passes():
    reference = [{"task": "rpn", "variant": "none", "metric": "map50", "mean": "0.7", "tolerance": "1.2",
                  "config_hash": "h"},
                 {"task": "rpn", "variant": "none", "metric": "map_coco", "mean": "5.0", "tolerance": "1.0",
                  "config_hash": "h"}]
    report = gate.compare_to_reference(1, reference, [])
    assert any("1 of 2 smoke bands include 0" in n for n in report.notes), report.notes


def test_cpu_probe_fails_a_rerun_that_learned_nothing_and_passes_one_within_the_seed_spread(tmp_path, monkeypatch):
    """The gate re-runs one committed cpu-tier cell (DeepLab res5a-c) at seed 0: a number within its
    committed seeds' band passes; the all-background score (12.8) fails (the smoke part cannot tell)."""
    from dcnbench.runner.experiment import expand_cells, load_experiment

    table, task, variant = gate.CPU_PROBE
    (config_hash,) = {c.config_hash for c in expand_cells(load_experiment(table), "cpu")
                      if (c.task, c.variant) == (task, variant)}
    root = tmp_path / "ablate"
    _write_results(root / f"table{table}_cpu.csv", table, "cpu", {(task, variant): {"miou": [26.5, 28.5, 27.1]}})
    rows = list(csv.DictReader((root / f"table{table}_cpu.csv").open(newline="")))
    for r in rows:
        r.update(config_hash=config_hash, threads="2")
    with (root / f"table{table}_cpu.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    calls = []
    for rerun, ok in [(27.0, True), (12.8, False)]:
        monkeypatch.setattr(gate, "_run_probe", lambda t, k, v, jobs, out, value=rerun: calls.append(jobs) or [
            {**rows[0], "seed": "0", "miou": str(value)}])
        report = gate.check_cpu_probe(root=root)
        assert report.ok is ok, report.text()
    assert calls[0] == max(1, (os.cpu_count() or 1) // 2)  # the committed runs' thread count
    assert "table 1 cpu deeplab/res5a-c miou" in report.text()


def test_committed_cpu_csvs_have_every_run_cell_current(tmp_path):
    """The committed cpu-tier CSVs (Tables 1-3) pass the stricter gate (every cell with runs has
    current runs); the gate checked something (a missing CSV made it pass with nothing checked)."""
    root = tmp_path / "ablate"
    root.mkdir()
    for n in (1, 2, 3):
        shutil.copy(RESULTS_DIR / "ablate" / f"table{n}_cpu.csv", root / f"table{n}_cpu.csv")
    report = gate.check_cpu_csvs(root=root)
    assert report.ok and report.passed, report.text()


def test_figures_and_table_cli_report_a_malformed_default_csv_without_a_traceback(tmp_path, monkeypatch):
    """A malformed CSV in the --results-dir folder: `figures` exits 1 with the reason; `table` run
    on its default CSV says so without blaming a --results option that was not given."""
    import dcnbench.report.tables as tables
    from dcnbench.cli import main

    bad = tmp_path / "ablate" / "table1_smoke.csv"
    _write_results(bad, 3, "smoke", {("deeplab", "atrous-2"): {"miou": [20.0, 21.0]}})
    result = CliRunner().invoke(main, ["figures", "--tier", "smoke", "--table", "1", "--results-dir",
                                       str(bad.parent), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 1 and "expected 1/smoke" in result.output
    monkeypatch.setattr(tables, "results_csv", lambda n, tier, root=None: bad)
    result = CliRunner().invoke(main, ["table", "1", "--tier", "smoke", "--out", str(tmp_path / "t")])
    assert result.exit_code == 1 and "expected 1/smoke" in result.output and "--results" not in result.output


def test_table_of_a_named_csv_is_written_beside_it_not_over_the_committed_tables(tmp_path):
    """`table N --results X` without --out writes X's folder/table<N>_<tier>.md; results/tables/ is
    left as committed."""
    from dcnbench.cli import main

    committed = RESULTS_DIR / "tables" / "table1_cpu.md"
    before = committed.read_bytes()
    path = tmp_path / "mine.csv"
    _write_results(path, 1, "cpu", T1)
    result = CliRunner().invoke(main, ["table", "1", "--format", "csv", "--results", str(path)])
    assert result.exit_code == 0, result.output
    assert "61.0 ± 1.0" in (tmp_path / "table1_cpu.md").read_text()
    assert committed.read_bytes() == before
