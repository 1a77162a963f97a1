"""The runner end to end on the smoke tier: rows, resume, determinism, surviving a kill."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from dcnbench.cli import main
from dcnbench.runner.ablate import ablation_cells
from dcnbench.runner.results import read_rows
from dcnbench.runner.train import lr_factor, run_cell


def test_lr_schedule_warms_up_then_steps_at_two_thirds():
    assert lr_factor(0, 300, 30) == 1 / 3
    assert lr_factor(30, 300, 30) == 1.0
    assert lr_factor(199, 300, 0) == 1.0
    assert lr_factor(200, 300, 0) == 0.1


def test_same_seed_trains_the_same_weights_and_another_seed_others(tmp_path):
    """A cell's seed fixes its run: the same seed gives bitwise the same trained weights and metrics,
    another seed other weights (the smoke tier's mIoU alone is the same for every seed, so it could
    not tell)."""
    import torch

    cell = ablation_cells(1, "smoke", ["deeplab"])[3]
    runs = []
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        metrics = run_cell({**cell.config, "seed": seed}, io.StringIO(), tmp_path / f"{name}.pt")
        runs.append((metrics["miou"], torch.load(tmp_path / f"{name}.pt", weights_only=True)))
    (miou_a, weights_a), (miou_b, weights_b), (_, weights_c) = runs
    assert miou_a == miou_b and weights_a.keys() == weights_b.keys() == weights_c.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


def test_ablate_writes_rows_and_resumes(tmp_path):
    args = ["ablate", "--table", "1", "--tier", "smoke", "--task", "deeplab", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "table1_smoke.csv")
    assert [r["variant"] for r in rows] == ["none", "res5c", "res5b-c", "res5a-c", "res5+res4b20-22"]
    assert all(0 <= float(r["miou"]) <= 100 and r["git_commit"] and r["config_hash"] for r in rows)
    assert (tmp_path / "checkpoints" / "table1_smoke" / "deeplab__res5a-c__seed0.pt").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 ran, 5 already done" in again.output
    assert len(read_rows(tmp_path / "table1_smoke.csv")) == 5


def test_killed_sweep_keeps_finished_rows_and_restarts_cleanly(tmp_path):
    """SIGKILL mid-sweep: the CSV holds only whole rows; a rerun finishes each cell exactly once."""
    csv_path = tmp_path / "table1_smoke.csv"
    cmd = [sys.executable, "-m", "dcnbench.cli", "ablate", "--table", "1", "--tier", "smoke", "--task", "deeplab",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_rows(csv_path)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = read_rows(csv_path)
    assert 2 <= len(rows) < 5 or len(rows) == 5
    assert all(r["torch"] for r in rows)  # last column present: no torn row
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    variants = [r["variant"] for r in read_rows(csv_path)]
    assert sorted(variants) == sorted(["none", "res5c", "res5b-c", "res5a-c", "res5+res4b20-22"])


def test_identical_run_of_another_table_is_reused_not_rerun(tmp_path):
    """Table 3's atrous-2 is Table 1's none: after Table 1 ran, Table 3 copies that row (marked)."""
    t1 = ablation_cells(1, "smoke", ["deeplab"])
    t3 = ablation_cells(3, "smoke", ["deeplab"])
    by_variant = {c.variant: c for c in t1 + t3}
    assert by_variant["atrous-2"].run_hash == by_variant["none"].run_hash
    assert by_variant["atrous-2"].config_hash != by_variant["none"].config_hash
    assert by_variant["atrous-4"].run_hash != by_variant["none"].run_hash
    base = ["ablate", "--tier", "smoke", "--task", "deeplab", "--out", str(tmp_path)]
    assert CliRunner().invoke(main, [*base, "--table", "1"]).exit_code == 0
    result = CliRunner().invoke(main, [*base, "--table", "3"])
    assert result.exit_code == 0, result.output
    assert "3 ran, 2 already done" in result.output  # atrous-4/6/8 ran; atrous-2, deform-conv reused
    t1_rows = {r["variant"]: r for r in read_rows(tmp_path / "table1_smoke.csv")}
    t3_rows = {r["variant"]: r for r in read_rows(tmp_path / "table3_smoke.csv")}
    for t3_variant, t1_variant in [("atrous-2", "none"), ("deform-conv", "res5a-c")]:
        row, source = t3_rows[t3_variant], t1_rows[t1_variant]
        assert row["reused_from"] == f"table1_smoke.csv:{t1_variant}:seed0"
        assert row["miou"] == source["miou"] and row["date"] == source["date"]
        assert row["table"] == "3" and row["config_hash"] == by_variant[t3_variant].config_hash
    assert all(not t3_rows[v]["reused_from"] for v in ("atrous-4", "atrous-6", "atrous-8"))


def test_two_sweeps_into_one_folder_write_each_run_once(tmp_path):
    """A run another sweep into the same folder wrote meanwhile is not appended again (the file
    stays one row per run, which the tables require)."""
    from dcnbench.runner.results import append_row

    row = {"table": 1, "tier": "smoke", "task": "deeplab", "variant": "none", "seed": 0, "mIoU": 0.5,
           "config_hash": "abc", "device": "cpu"}
    path = tmp_path / "table1_smoke.csv"
    assert append_row(path, row)
    assert not append_row(path, {**row, "mIoU": 0.6})  # the same run, finished by a second sweep
    assert append_row(path, {**row, "seed": 1})
    assert append_row(path, {**row, "device": "cpu x2"})  # another process count: another run
    assert [(r["seed"], r["mIoU"], r["device"]) for r in read_rows(path)] == [
        ("0", "0.5", "cpu"), ("1", "0.5", "cpu"), ("0", "0.5", "cpu x2")]


def test_ablate_refuses_a_results_csv_of_another_table(tmp_path):
    """ablate does not append Table 1 rows to a file holding Table 3 rows: a usage error naming --out."""
    from dcnbench.runner.results import append_row

    append_row(tmp_path / "table1_smoke.csv", {"table": 3, "tier": "smoke", "task": "deeplab", "variant": "d2",
                                               "seed": 0, "config_hash": "x"})
    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--out" in result.output and "line 2: table/tier 3/smoke, expected 1/smoke" in result.output
    assert len(read_rows(tmp_path / "table1_smoke.csv")) == 1


@pytest.mark.parametrize("kind", ["not utf-8", "a folder"])
def test_ablate_refuses_a_results_path_that_is_not_a_csv_file_before_running(tmp_path, kind):
    """A non-UTF-8 file or a folder where the results CSV goes: a usage error naming --out before any
    run (a traceback, or for a folder a crash after the first run trained)."""
    path = tmp_path / "table1_smoke.csv"
    if kind == "a folder":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x00table")
    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and str(path) in result.output.replace("\n", "")
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


def test_ablate_checks_data_root_and_weights_before_running(tmp_path):
    """The paper tier without --data-root, and weights that do not fit the tier's backbone, are usage
    errors naming the option before any run starts (each cell used to fail on its own)."""
    import torch
    import torchvision

    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "paper", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "--data-root" in result.output and "real datasets" in result.output
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--task", "deeplab",
                                       "--weights", str(weights), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "--weights" in result.output and "do not fit tier smoke" in result.output
    assert not (tmp_path / "w" / "table1_smoke.csv").exists()


def test_a_new_weights_file_at_the_same_path_is_another_run(tmp_path):
    """The cells' hashes (resume, reuse of identical runs) covered the --weights path but not the
    file: replacing the file and rerunning kept the old file's rows as done. The digest is part of
    the config now, and a file changed after the sweep started is refused where it is loaded."""
    import torch

    from dcnbench.models.build import build_model

    def save_weights(seed):
        torch.manual_seed(seed)
        cell = ablation_cells(1, "smoke", ["rpn"], variants=["none"])[0]
        model = build_model({**cell.config["model"], "task": "rpn", "num_classes": 2})
        torch.save({k.removeprefix("backbone."): v for k, v in model.state_dict().items()
                    if k.startswith("backbone.") and not k.startswith("backbone.reduce.")}, weights)

    weights = tmp_path / "w.pth"
    save_weights(1)
    (first,) = ablation_cells(1, "smoke", ["rpn"], variants=["none"], weights=str(weights))
    save_weights(2)
    (second,) = ablation_cells(1, "smoke", ["rpn"], variants=["none"], weights=str(weights))
    assert first.config["model"]["weights"] == second.config["model"]["weights"]
    assert first.config_hash != second.config_hash and first.run_hash != second.run_hash
    with pytest.raises(ValueError, match="changed since the sweep started"):
        run_cell(first.config, io.StringIO())


def test_output_folder_that_cannot_be_created_is_a_usage_error(tmp_path):
    """An --out below a file names the option (exit 2), for every command that writes a folder."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = str(blocker / "sub")
    for args in (["ablate", "--table", "1", "--tier", "smoke", "--out", bad],
                 ["data", "synth", "--num", "2", "--size", "32", "--out", bad],
                 ["runtime", "--params-only", "--results-dir", bad],
                 ["bench", "ops", "--out", bad],
                 ["figures", "--out", bad]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        option = "--results-dir" if "--results-dir" in args else "--out"
        assert option in result.output and "cannot create folder" in result.output, result.output
