"""Runner robustness: dead workers, a killed sweep process, checkpoints cut short, concurrent
writers of one CSV, provenance of the command, and mistakes in the experiment definitions."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from dcnbench.cli import main
from dcnbench.errors import InvalidSetting
from dcnbench.runner import experiment, sweep
from dcnbench.runner.experiment import EXPERIMENTS_DIR, Cell, expand_cells, load_experiment
from dcnbench.runner.results import PROVENANCE_COLUMNS, claim_file, read_rows

ROOT = Path(__file__).resolve().parents[1]  # subprocesses import dcnbench from the checkout


def fake_run(config, log_path, checkpoint, threads, proposals_dir):
    """A stand-in for a training run (imported by the spawned workers): variant "boom" kills its
    own worker process, as the out-of-memory killer would; the others take 0.3 s."""
    if config["variant"] == "boom":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.3)
    Path(log_path).write_text("ran\n")
    return {"miou": float(config["seed"]), "wall_s": 0.3, "device": "cpu", "threads": threads}


def _cells(variants: list[str], seeds: int = 1) -> list[Cell]:
    return [Cell(1, "smoke", "deeplab", v, s, {"task": "deeplab", "variant": v, "seed": s, "data": {}, "model": {},
                                               "train": {}, "eval": {}})
            for v in variants for s in range(seeds)]


def test_a_dead_worker_fails_its_own_cell_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """Before: the dead worker broke the pool, the run beside it was reported failed too and the next
    submit raised BrokenProcessPool out of the sweep. Now the runs in flight are rerun alone, and only
    the cell whose worker died alone fails."""
    monkeypatch.setattr(sweep, "_run_in_worker", fake_run)
    cells = _cells(["a", "boom", "b"])
    csv_path = tmp_path / "table1_smoke.csv"
    report = sweep.run_sweep(cells, csv_path, tmp_path / "logs", tmp_path / "ckpt", 2, Console(quiet=True))
    assert [name for name, _ in report.failed] == ["deeplab__boom__seed0"] and report.ran == 2
    assert sorted(r["variant"] for r in read_rows(csv_path)) == ["a", "b"]
    assert "worker process died" in (tmp_path / "logs" / "deeplab__boom__seed0.log").read_text()


POOL_THEN_WAIT = textwrap.dedent("""
    import sys, time
    from dcnbench.runner.sweep import worker_pool
    pool = worker_pool(1)
    pool.submit(time.sleep, 0).result()  # the worker is up
    print(next(iter(pool._processes)), flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc/<pid>/stat")
def test_workers_end_when_the_sweep_process_is_killed(tmp_path):
    """SIGTERM or SIGKILL to the sweep's process alone (``kill PID``, a container stop) left its
    worker processes running on as orphans, each finishing and saving a run nobody records."""
    proc = subprocess.Popen([sys.executable, "-c", POOL_THEN_WAIT], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        worker = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and _alive(worker):
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_a_checkpoint_save_cut_short_leaves_no_truncated_file(tmp_path, monkeypatch):
    """A run killed while writing its weights left a truncated ``<cell>.pt`` in place of the last good
    one (beside a ``.json`` of the old config); now the old pair stays whole."""
    from dcnbench.runner.train import save_checkpoint

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "ckpt" / "deeplab__none__seed0.pt"
    save_checkpoint(model, {"variant": "old"}, path)
    good = path.read_bytes()

    def cut_short(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(torch.nn.Linear(3, 2), {"variant": "new"}, path)
    assert path.read_bytes() == good and '"old"' in path.with_suffix(".json").read_text()
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["weight"], model.weight.detach())


APPEND_MANY = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dcnbench.runner.results import append_row
    for i in range(int(sys.argv[3])):
        append_row(Path(sys.argv[1]), {"table": 1, "tier": "smoke", "task": sys.argv[2], "variant": "v", "seed": i,
                                       "miou": 1.0, "config_hash": "h", "torch": "t"})
""")


def test_two_processes_appending_to_one_csv_keep_every_row(tmp_path):
    """Two sweeps writing one folder (e.g. --task deeplab and --task rpn started side by side) lost
    rows (read-modify-write races) and crashed on each other's temporary file; now every row stays."""
    path, n = tmp_path / "table1_smoke.csv", 150
    procs = [subprocess.Popen([sys.executable, "-c", APPEND_MANY, str(path), who, str(n)], stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for who in ("A", "B")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    rows = read_rows(path)
    assert sorted((r["task"], int(r["seed"])) for r in rows) == [(w, i) for w in "AB" for i in range(n)]


def test_rows_record_the_command_that_ran_them(tmp_path, monkeypatch):
    """Provenance: the command as typed, beside commit, date and machine (as runtime and bench CSVs do)."""
    monkeypatch.setattr(sweep, "_run_in_worker", fake_run)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/dcnbench", "ablate", "--table", "1", "--out", "my out"])
    csv_path = tmp_path / "table1_smoke.csv"
    sweep.run_sweep(_cells(["a"]), csv_path, tmp_path / "logs", tmp_path / "ckpt", 1, Console(quiet=True))
    (row,) = read_rows(csv_path)
    assert "command" in PROVENANCE_COLUMNS and list(row)[-1] == "torch"
    assert row["command"] == "dcnbench ablate --table 1 --out 'my out'"


def test_rows_record_the_commit_the_sweep_started_from(tmp_path, monkeypatch):
    """Before: each row read the commit when it was written, so a tree changed (a stash, a branch
    switch) during a sweep labelled rows run with the old configs by the new commit."""
    monkeypatch.setattr(sweep, "_run_in_worker", fake_run)
    commits = iter(f"commit{i}" for i in range(100))
    monkeypatch.setattr(sweep, "git_commit", lambda: next(commits))
    csv_path = tmp_path / "table1_smoke.csv"
    sweep.run_sweep(_cells(["a", "b"]), csv_path, tmp_path / "logs", tmp_path / "ckpt", 1, Console(quiet=True))
    assert [r["git_commit"] for r in read_rows(csv_path)] == ["commit0", "commit0"]


def test_sweep_threads_share_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """Before: os.cpu_count() // jobs, so OMP_NUM_THREADS=1 or taskset -c 0 on a 2-core machine
    still gave 2 threads a worker (a 50x slowdown measured on a loaded machine)."""
    from dcnbench.runner.results import cpu_budget

    monkeypatch.setattr(sweep, "_run_in_worker", fake_run)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_budget() == 1
    csv_path = tmp_path / "table1_smoke.csv"
    sweep.run_sweep(_cells(["a"]), csv_path, tmp_path / "logs", tmp_path / "ckpt", 1, Console(quiet=True))
    assert [r["threads"] for r in read_rows(csv_path)] == ["1"]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_budget() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpu_budget() == 1


def test_a_cell_another_sweep_is_running_is_skipped_not_run_twice(tmp_path, monkeypatch):
    """Two sweeps into one folder ran the same cell at once: each truncated the other's log, and
    one failed renaming the checkpoint's temporary file the other had already moved. A sweep now
    claims a cell (a lock on its log) for as long as it runs it, and skips a claimed one."""
    monkeypatch.setattr(sweep, "_run_in_worker", fake_run)
    csv_path, logs = tmp_path / "table1_smoke.csv", tmp_path / "logs"
    logs.mkdir()
    other = claim_file(logs / "deeplab__b__seed0.log")  # another sweep, running cell b
    assert other is not None and claim_file(logs / "deeplab__b__seed0.log") is None
    console = Console(record=True, width=200)
    report = sweep.run_sweep(_cells(["a", "b"]), csv_path, logs, tmp_path / "ckpt", 1, console)
    assert (report.ran, report.skipped, report.failed) == (1, 1, [])
    assert "skipped deeplab__b__seed0: another sweep into this folder is running it" in console.export_text()
    assert [r["variant"] for r in read_rows(csv_path)] == ["a"]
    os.close(other)  # that sweep stopped without finishing b: the next sweep runs it
    report = sweep.run_sweep(_cells(["a", "b"]), csv_path, logs, tmp_path / "ckpt", 1, Console(quiet=True))
    assert (report.ran, report.skipped) == (1, 1) and [r["variant"] for r in read_rows(csv_path)] == ["a", "b"]


def _definitions(tmp_path: Path, table_text: str) -> Path:
    shutil.copy(EXPERIMENTS_DIR / "tiers.toml", tmp_path / "tiers.toml")
    (tmp_path / "table1.toml").write_text(textwrap.dedent("""
        table = 1
        tasks = ["deeplab", "rpn"]
        baseline = "none"
        [[variants]]
        name = "none"
        model = { placement = "none" }
    """) + textwrap.dedent(table_text))
    return tmp_path


@pytest.mark.parametrize("text,error", [
    ('[[variants]]\nname = "x"\nmodle = { placement = "res5c" }\n', r"variant 'x' has unknown key\(s\) \['modle'\]"),
    ('[[variants]]\nname = "x"\nmodel = { placment = "res5c" }\n',
     r"variant 'x'.model has unknown key\(s\) \['placment'\]"),
    ('[[variants]]\nname = "x"\ntrain = { learning_rate = 0.1 }\n',
     r"variant 'x'.train has unknown key\(s\) \['learning_rate'\]"),
    ('[[variants]]\nname = "none"\n', "variants 'none' and 'none' share the name"),
    ('[[variants]]\nname = "a+b"\n[[variants]]\nname = "a_b"\n', "variants 'a\\+b' and 'a_b' share the name"),
    ('[[variants]]\nname = "x"\ntasks = ["rfcn"]\n', r"variant 'x' names task\(s\) \['rfcn'\] the table lacks"),
    ('[tiers.smoke]\ntrian = { iters = 2 }\n', r"tiers.smoke has unknown key\(s\) \['trian'\]"),
    ('[tiers.smoke.task.deeplab]\nmodel = { widht = 4 }\n',
     r"tiers.smoke.task.deeplab.model has unknown key\(s\) \['widht'\]"),
    ('[[variants]]\nmodel = { placement = "res5c" }\n', "variant '#2' needs a name"),
    ('model = {\n', "is not valid TOML"),
])
def test_mistakes_in_a_definition_are_refused_naming_file_and_key(tmp_path, text, error):
    """Before: an unknown section or key was ignored (the variant silently trained the baseline's
    config), duplicate names shared logs and checkpoints; now each is an error naming where."""
    directory = _definitions(tmp_path, text)
    with pytest.raises(InvalidSetting, match=error) as info:
        expand_cells(load_experiment(1, directory), "smoke")
    assert str(directory / "table1.toml") in str(info.value) and info.value.fields == ("table",)


def test_a_cell_missing_a_training_setting_is_refused_before_any_run(tmp_path):
    (tmp_path / "tiers.toml").write_text((EXPERIMENTS_DIR / "tiers.toml").read_text().replace("iters = 6, ", ""))
    shutil.copy(EXPERIMENTS_DIR / "table1.toml", tmp_path)
    with pytest.raises(InvalidSetting, match="tier smoke: the deeplab cell of variant 'none' lacks train.iters"):
        expand_cells(load_experiment(1, tmp_path), "smoke")
    assert len(expand_cells(load_experiment(1, tmp_path), "cpu")) == 60  # the cpu tier is whole


@pytest.mark.parametrize("text,error", [
    ('eval = { dilation_buckets = "tercile" }', "eval.dilation_buckets must be 'terciles' or 'paper', got 'tercile'"),
    ('eval = { area_ranges = "cocoo" }', "eval.area_ranges must be 'coco', 'terciles' or"),
    ('eval = { area_ranges = { small = [0, 1024], medium = [1024, 9216] } }', "eval.area_ranges must be"),
    ('eval = { area_ranges = { small = [0, 1024], medium = [9216, 1024], large = [9216, 1e10] } }',
     "eval.area_ranges must be"),
    ('eval = { effective_dilation = "yes" }', "eval.effective_dilation must be true or false, got 'yes'"),
    ('eval = { batch_size = 0 }', "eval.batch_size must be a positive integer, got 0"),
    ('train = { iters = 0 }', "train.iters must be a positive integer, got 0"),
    ('train = { lr = "0.01" }', "train.lr must be a positive number, got '0.01'"),
    ('train = { momentum = 1.0 }', r"train.momentum must be a number in \[0, 1\), got 1.0"),
    ('model = { width = 0 }', "model config 'width' must be a positive integer, got 0"),
    # a setting of the detection heads, in a variant of a table with DeepLab: it built DeepLab without it, silently
    ('model = { deformable_roi_pool = true }',
     r"model config 'deformable_roi_pool' is used by the tasks \['faster_rcnn', 'rfcn'\] only, not by 'deeplab'"),
    ('data = { num_train = 3 }', r"data.num_train \(3\) must be at least train.batch_size \(4\)"),  # the loop spun
])
def test_a_bad_value_in_a_definition_is_refused_when_it_is_loaded(tmp_path, text, error):
    """Before: an evaluation setting was read only after the cell had trained (a misspelled
    ``dilation_buckets`` failed minutes into a run, and a dict missing a size class at the end of
    evaluation), and ``iters = 0`` evaluated an untrained model as if it were a result."""
    directory = _definitions(tmp_path, f'[[variants]]\nname = "x"\n{text}\n')
    with pytest.raises(InvalidSetting, match=f"tier smoke: the deeplab cell of variant 'x': {error}"):
        expand_cells(load_experiment(1, directory), "smoke")


def test_training_on_fewer_images_than_a_batch_stops_instead_of_spinning():
    """A real dataset smaller than a batch (not known when the table is loaded): every incomplete
    batch is dropped, and the endless pass over the loader used to spin without a batch."""
    from torch.utils.data import TensorDataset

    from dcnbench.runner.train import _forever, _loader

    with pytest.raises(ValueError, match=r"the training set \(3 images\) is smaller than one batch"):
        next(_forever(_loader(TensorDataset(torch.zeros(3, 1)), "rpn", 4, True, 0)))


def _header_and(line: str) -> str:
    return "table,tier,task,variant,seed,config_hash,run_hash,device\n" + line + "\n"


@pytest.mark.parametrize("files,error", [
    ({"table3_smoke.csv": b"\xa8\x00binary"}, r"table3_smoke.csv is not a readable CSV"),
    ({"table3_smoke.csv": _header_and("3,smoke,rpn,none,x,abc,def,cpu")},
     r"table3_smoke.csv: line 2: seed 'x' is not an integer"),
    ({"table1_smoke.csv": _header_and("1,smoke,rpn,none,0,{hash},def,cpu x2")},
     r"table1_smoke.csv holds runs of these cells by \[2\] process\(es\), this sweep runs with 1"),
])
def test_ablate_refuses_results_it_could_not_use_before_any_run(tmp_path, files, error):
    """Before: a bad table<M>_<tier>.csv beside the target (read for runs to reuse) raised a
    traceback once the sweep started, and a run by one process appended to a CSV holding the same
    cells run by two, which the tables then refused whole (and its checkpoints were overwritten)."""
    from dcnbench.runner.ablate import ablation_cells

    (cell,) = ablation_cells(1, "smoke", ["rpn"], variants=["none"])
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content.format(hash=cell.config_hash))
    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--task", "rpn", "--variant", "none",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value for '--out'" in result.output, result.output
    assert re.search(error, " ".join(result.output.split())), result.output
    assert not (tmp_path / "logs").exists()


def test_ablate_reports_a_bad_definition_as_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    directory = _definitions(tmp_path / "exp", '[[variants]]\nname = "x"\nmodle = { placement = "res5c" }\n')
    monkeypatch.setattr(experiment, "EXPERIMENTS_DIR", directory)
    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Invalid value for '--table'" in result.output and "'modle'" in result.output
    assert not (tmp_path / "out").exists()


def test_committed_definitions_pass_the_checks():
    for table in (1, 2, 3):
        for tier in experiment.TIERS:
            assert expand_cells(load_experiment(table), tier)


def test_data_root_for_a_synthetic_tier_is_refused_not_ignored():
    """``--data-root`` with the smoke/cpu tier trained on synthetic data as before (the root unread)
    under a new config hash; now it is an error naming --data-root. The paper tier gets the root."""
    from dcnbench.runner.ablate import ablation_cells

    with pytest.raises(InvalidSetting, match="tier cpu trains on the synthetic benchmark") as info:
        ablation_cells(1, "cpu", ["deeplab"], data_root="/data")
    assert info.value.fields == ("data_root",)


def _resnet101_weights(path: Path) -> Path:
    import torchvision

    torch.save(torchvision.models.resnet101().state_dict(), path)
    return path


def test_paper_tier_needs_imagenet_weights_and_the_datasets_where_data_root_points(tmp_path):
    """The paper tier without --weights trained ResNet-101 from scratch, silently (its frozen
    BatchNorm keeps the statistics of the weights it loads); a --data-root without the datasets
    started every run, each failing on its own. Both are now errors naming the option before any
    run; with weights and a real VOC layout the cells get both."""
    from test_data_loaders import _voc_seg_fixture

    from dcnbench.runner.ablate import ablation_cells

    with pytest.raises(InvalidSetting, match="tier paper trains ResNet from ImageNet weights") as info:
        ablation_cells(1, "paper", ["deeplab"], data_root=str(tmp_path), variants=["none"])
    assert info.value.fields == ("weights",)
    weights = _resnet101_weights(tmp_path / "r101.pth")
    with pytest.raises(InvalidSetting, match="deeplab__none__seed0 reads voc_seg: .*no dataset found") as info:
        ablation_cells(1, "paper", ["deeplab"], data_root=str(tmp_path / "empty"), weights=str(weights),
                       variants=["none"])
    assert info.value.fields == ("data_root",)
    _voc_seg_fixture(tmp_path / "voc")
    (cell,) = ablation_cells(1, "paper", ["deeplab"], data_root=str(tmp_path / "voc"), weights=str(weights),
                             variants=["none"])
    assert cell.config["data"] == {"source": "voc_seg", "shorter_side": 360, "root": str((tmp_path / "voc").resolve())}
    assert cell.config["model"]["weights"] == str(weights.resolve())


def test_paper_tier_rows_show_in_the_paper_tier_table(tmp_path):
    """The rows of a paper-tier sweep never matched `dcnbench table --tier paper`: their config hash
    holds the dataset root and weights file the sweep was given, which the table's hashes of the
    experiment files cannot. Rows carry a definition_hash without them, which the table matches;
    rows of one cell from two weights files are refused, not averaged; a weights file moved to
    another path is the same file (hashed by its SHA-256, not its path)."""
    from dcnbench.report.tables import load_ours
    from dcnbench.runner.results import append_row
    from dcnbench.runner.sweep import _row

    from test_data_loaders import _voc_seg_fixture

    from dcnbench.runner.ablate import ablation_cells

    _voc_seg_fixture(tmp_path / "voc")
    weights = _resnet101_weights(tmp_path / "r101.pth")
    (cell,) = ablation_cells(1, "paper", ["deeplab"], data_root=str(tmp_path / "voc"), weights=str(weights),
                             variants=["none"])
    moved = tmp_path / "moved" / "r101.pth"  # the same bytes elsewhere: the same run (hashed by SHA-256)
    moved.parent.mkdir()
    weights.rename(moved)
    (again,) = ablation_cells(1, "paper", ["deeplab"], data_root=str(tmp_path / "voc"), weights=str(moved),
                              variants=["none"])
    assert again.config["model"]["weights"] != cell.config["model"]["weights"]
    assert (again.config_hash, again.run_hash) == (cell.config_hash, cell.run_hash)
    csv_path = tmp_path / "out" / "table1_paper.csv"
    append_row(csv_path, _row(cell, {"miou": 70.0}, "abc"))
    ours = load_ours(1, "paper", csv_path)
    assert ours.rows_used == 1 and ours.stats[("deeplab", "none", "miou")].mean == 70.0
    other = Cell(cell.table, cell.tier, cell.task, cell.variant, 1,
                 {**cell.config, "seed": 1, "model": {**cell.config["model"], "weights_sha256": "0" * 64}})
    assert other.definition_hash == cell.definition_hash and other.config_hash != cell.config_hash
    append_row(csv_path, _row(other, {"miou": 60.0}, "abc"))
    with pytest.raises(ValueError, match="deeplab/none with different datasets or weights files"):
        load_ours(1, "paper", csv_path)


def test_ablate_cli_refuses_data_root_for_a_synthetic_tier_before_running(tmp_path):
    """The CLI's check before any run sees --data-root: a usage error naming it (exit 2), no traceback."""
    from click.testing import CliRunner

    from dcnbench.cli import main

    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--data-root", str(tmp_path),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--data-root" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_ablate_cli_interrupted_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C during a sweep: exit 130 with where the finished runs are and that the command resumes."""
    from click.testing import CliRunner

    import dcnbench.runner.ablate as ablate
    from dcnbench.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "run_ablation", interrupted)
    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--out", str(tmp_path)])
    assert result.exit_code == 130
    assert f"{tmp_path}/table1_smoke.csv" in result.output and "the same command resumes" in result.output


def test_paper_tier_scores_voc_2007_test_with_its_11_point_ap(monkeypatch):
    """The paper tier's detectors are evaluated on VOC 2007 test with the 11-point AP (the released
    detectors' metric for that set): the tier sets voc07_metric and evaluate passes it on."""
    from torch import nn

    import dcnbench.runner.train as train
    from dcnbench.evaluation import DetectionEvaluator
    from dcnbench.runner.experiment import expand_cells, load_experiment

    assert all(c.config["eval"]["voc07_metric"] for c in expand_cells(load_experiment(1), "paper", ["rfcn"]))
    assert not any(c.config["eval"].get("voc07_metric") for c in expand_cells(load_experiment(1), "cpu", ["rfcn"]))
    used = []

    class Recording(DetectionEvaluator):
        def __init__(self, *args, **kwargs):
            used.append(kwargs.get("use_07_metric"))
            super().__init__(*args, **kwargs)

    class Fixed(nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": torch.tensor([0.9]),
                     "labels": torch.tensor([1])} for _ in images]

    monkeypatch.setattr(train, "DetectionEvaluator", Recording)
    target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1]), "image_id": 0}
    metrics = train.evaluate(Fixed(), "rfcn", [(torch.zeros(3, 8, 8), target)], 1, {"voc07_metric": True})
    assert used == [True] and metrics["map50"] == pytest.approx(100.0)


def test_deeplab_is_scored_against_the_label_file_at_its_resolution():
    """VOC protocol: predictions of a resized image are upsampled to the label file's size and scored
    against its mask (``orig_mask``), each image cropped out of its padded batch first."""
    from torch import nn

    import dcnbench.runner.train as train

    class Painted(nn.Module):  # class 1 where the image's first channel is 1, class 0 elsewhere (padding too)
        def forward(self, images):
            one = 2 * images[:, 0] - 1
            return torch.stack([-one, one], dim=1)

    def item(h, w, scale):
        image = torch.zeros(3, h, w)
        image[0, :, : w // 2] = 1
        truth = torch.zeros(h * scale, w * scale, dtype=torch.long)
        truth[:, : w * scale // 2] = 1
        resized = torch.full((h, w), 255, dtype=torch.long)  # would score nothing if it were used
        return image, {"mask": resized, "orig_mask": truth}

    # Labels 2x and 3x the image size; a 4x4 image padded to 4x8 in its batch.
    metrics = train.evaluate(Painted(), "deeplab", [item(4, 8, 2), item(4, 8, 3), item(4, 4, 2)], 1,
                             {"batch_size": 3})
    assert metrics["miou"] == pytest.approx(100.0)


def test_ablate_cli_refuses_a_process_count_that_does_not_divide_the_batch(tmp_path):
    """--nproc 3 with the smoke tier's global batch of 4: a usage error before torchrun is launched."""
    from click.testing import CliRunner

    from dcnbench.cli import main

    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--nproc", "3",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--nproc" in result.output and "global batch of 4" in result.output
    assert not (tmp_path / "out").exists()


LONG_SWEEP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dcnbench.runner.ablate import ablation_cells
    from dcnbench.runner.sweep import run_sweep

    cell = ablation_cells(1, "smoke", ["deeplab"])[0]
    cell.config["train"]["iters"] = 10**6  # runs until stopped
    out = Path(sys.argv[1])
    run_sweep([cell], out / "t.csv", out / "logs", out / "ckpt", jobs=1)
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigint_to_the_sweep_process_alone_stops_the_runs_in_flight(tmp_path):
    """SIGINT to the sweep's process only (``kill -INT PID``, ``timeout -s INT``): the workers, which did
    not get it, are stopped at once instead of the sweep waiting for their runs to finish."""
    proc = subprocess.Popen([sys.executable, "-c", LONG_SWEEP, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "logs" / "deeplab__none__seed0.log"
        deadline = time.time() + 120
        while time.time() < deadline and "iter" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.2)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert workers, "the worker is training"
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_paper_tier_fixes_conv1_and_res2_as_the_released_code():
    """The paper tier fine-tunes with conv1 and res2 fixed (the released code's FIXED_PARAMS); the
    CPU tiers train every stage."""
    from dcnbench.runner.experiment import expand_cells, load_experiment

    for table in (1, 3):
        assert all(c.config["model"]["freeze_at"] == 2 for c in expand_cells(load_experiment(table), "paper", None))
        assert not any(c.config["model"].get("freeze_at") for c in expand_cells(load_experiment(table), "cpu", None))


def test_output_defaults_are_the_checkouts_results_whatever_the_working_folder():
    """ablate, runtime, figures and bench ops write, by default, where table, figures, check and
    the README's generated sections read: the checkout's results/, not a results/ under the folder
    the command happens to run in."""
    from dcnbench.report.paper import RESULTS_DIR

    defaults = {(name, p.name): p.default for name, command in main.commands.items() for p in command.params}
    assert defaults["ablate", "out"] == str(RESULTS_DIR / "ablate")
    assert defaults["runtime", "results_dir"] == str(RESULTS_DIR)
    assert defaults["figures", "out"] == str(RESULTS_DIR / "figures")
    bench_out = {p.name: p.default for p in main.commands["bench"].commands["ops"].params}["out"]
    assert bench_out == str(RESULTS_DIR / "bench")
    assert RESULTS_DIR.is_absolute() and (RESULTS_DIR / "paper").is_dir()


def test_under_torchrun_only_rank_0_builds_and_checks_the_cells(monkeypatch):
    """Before: every rank (and the launching process) opened the datasets and hashed the weights file
    in ablation_cells' checks before the first run; now rank 0 does and sends the cells."""
    from click.testing import CliRunner

    import dcnbench.runner.ablate as ablate
    from dcnbench.cli import main
    from dcnbench.runner import distributed as dist

    sent, received = ablate.ablation_cells(1, "smoke", ["deeplab"]), []
    monkeypatch.setattr(dist, "init_from_env", lambda: True)
    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(dist, "broadcast", lambda obj: sent if obj is None else pytest.fail("rank 1 sent cells"))
    monkeypatch.setattr(ablate, "ablation_cells", lambda *a, **k: pytest.fail("rank 1 built the cells"))
    monkeypatch.setattr(ablate, "check_results_csv", lambda *a, **k: pytest.fail("rank 1 checked the CSVs"))
    monkeypatch.setattr(ablate, "run_ablation", lambda cells, jobs, out: received.append(cells) or [])
    result = CliRunner().invoke(main, ["ablate", "--table", "1", "--tier", "smoke", "--task", "deeplab"])
    assert result.exit_code == 0, result.output
    assert received == [sent]
