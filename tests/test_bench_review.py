"""Review of the benchmark commands: interrupted runs keep what finished, resume keys, option checks,
Table 4 from named CSVs."""

import csv
import io
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from dcnbench.bench import ops
from dcnbench.bench.report import evaluate_targets
from dcnbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# dcnbench bench ops


def test_interrupted_ops_benchmark_keeps_the_passes_it_finished(tmp_path, monkeypatch):
    """Ctrl-C during the second shape: the first shape's rows (both passes) are in the CSV, and the
    console says so; the interrupt still reaches the caller."""
    real, calls = ops.time_case, []

    def time_case(*args, **kwargs):
        calls.append(args[0].shape)
        if len(calls) == 3:  # shape "b", forward
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "time_case", time_case)
    log = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        ops.run_ops_benchmark({"a": (1, 2, 5, 5, 2, 1), "b": (1, 2, 6, 6, 2, 1)}, [1], "cpu", tmp_path, repeats=3,
                              with_roi=False, with_memory=False, console=Console(file=log, width=300))
    rows = read(tmp_path / "ops_cpu.csv")
    assert {(r["shape"], r["pass"]) for r in rows} == {("a", "forward"), ("a", "forward+backward")}
    assert len(rows) == 8  # 4 implementations x 2 passes
    assert f"the 8 rows measured are in {tmp_path / 'ops_cpu.csv'}" in log.getvalue()
    assert not list(tmp_path.glob("*.tmp"))


def test_ops_benchmark_interrupted_before_any_pass_leaves_the_old_csv(tmp_path, monkeypatch):
    (tmp_path / "ops_cpu.csv").write_text("old\n")
    monkeypatch.setattr(ops, "time_case", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ops.run_ops_benchmark({"a": (1, 2, 5, 5, 2, 1)}, [1], "cpu", tmp_path, repeats=3, with_roi=False,
                              with_memory=False, console=Console(file=io.StringIO()))
    assert (tmp_path / "ops_cpu.csv").read_text() == "old\n"


def test_shape_names_keep_their_meaning():
    """A built-in name keeps its dims (issue 3's targets are judged by name); the memory case's name is taken."""
    assert ops.parse_shape("res5=1,512,38,63,512,2") == ("res5", ops.CONV_SHAPES["res5"])
    with pytest.raises(ValueError, match="built-in shape res5=1,512,38,63,512,2"):
        ops.parse_shape("res5=1,8,8,8,8,2")
    with pytest.raises(ValueError, match="built-in shape small-b64=64,64,48,48,64,2"):
        ops.parse_shape("small-b64=1,2,4,4,2")
    assert ops.parse_shape("small-b64=64,64,48,48,64,2") == ops.MEMORY_SHAPE  # scripts/device_check.sh


@pytest.mark.parametrize("args,error", [
    (["--threads", "1,1"], "Invalid value for '--threads': expected distinct thread counts, got '1,1'"),
    (["--threads", "1,99999999999"], "Invalid value for '--threads': thread counts must be at most 1024"),  # overflowed
    (["--shapes", "tiny=1,2,4,4,2"], "Invalid value for '--shapes': 'tiny' is the built-in shape"),
    (["--shapes", "small-b64=1,2,4,4,2"], "Invalid value for '--shapes': 'small-b64' is the built-in shape"),
    (["--shapes", "x=1,2,4,4,2", "--shapes", "x=1,2,6,6,2"], "each shape needs its own name, x is given twice"),
])
def test_more_bad_bench_options_are_usage_errors(tmp_path, args, error):
    tiny = ["--shapes", "x=1,2,4,4,2"] if args[0] == "--threads" else ["--threads", "1"]  # quick if accepted
    result = CliRunner().invoke(main, ["bench", "ops", "--out", str(tmp_path / "out"), "--repeats", "3", "--no-roi",
                                       "--no-memory", *tiny, *args])
    assert result.exit_code == 2 and error in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_issue_targets_are_judged_only_on_their_own_shape():
    """A CSV row named "res5" but of other dims (an older run, a library call) is not judged as res5."""
    def row(impl, ms, desc):
        return {"op": "deform_conv2d", "implementation": impl, "shape": "res5", "shape_desc": desc,
                "pass": "forward+backward", "threads": "1", "ms": ms, "ratio_to_baseline": "3.0",
                "speedup_vs_torchvision": "1.0"}

    other = ops.conv_desc((1, 8, 8, 8, 8, 2))
    assert evaluate_targets([row(ops.NATIVE, "3", other), row(ops.NATIVE_MASKED, "3", other)]) == []
    own = ops.conv_desc(ops.CONV_SHAPES["res5"])
    checks = evaluate_targets([row(ops.NATIVE, "3", own), row(ops.NATIVE_MASKED, "3", own)])
    assert len(checks) == 3 and not checks[0]["met"]


# ---------------------------------------------------------------------------------------------
# dcnbench runtime (the networks and the clock stubbed: these tests check the bookkeeping)


@pytest.fixture
def stub_timing(monkeypatch):
    """run_runtime with tiny stand-in twins and fixed times; Ctrl-C arrives in model number
    ``stub_timing.interrupt_at`` (0-based) when set."""
    import dcnbench.runtime as rt

    class State:
        interrupt_at = None
        timed = 0

    def time_models(models, raw, hw, device, repeats, warmup=1, on_round=None):
        if State.timed == State.interrupt_at:
            raise KeyboardInterrupt
        State.timed += 1
        return {name: ([0.1] * repeats, [0.2] * repeats) for name in models}

    monkeypatch.setattr(rt, "build_twins", lambda task, extra, weights=None: {
        "plain": torch.nn.Linear(2, 2), "deformable": torch.nn.Linear(2, 3)})
    monkeypatch.setattr(rt, "time_models", time_models)
    return State


def test_runtime_resume_does_not_reuse_rows_of_another_thread_count(tmp_path, stub_timing):
    from dcnbench.runtime import run_runtime

    out = tmp_path / "t.csv"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_runtime(out, scale=0.05, repeats=2, models=["R-FCN"], log=lambda s: None)
        torch.set_num_threads(1)
        log = []
        run_runtime(out, scale=0.05, repeats=2, models=["R-FCN"], log=log.append)
    finally:
        torch.set_num_threads(threads)
    assert not any("already measured" in line for line in log)
    assert sorted(r["threads"] for r in read(out)) == ["1", "1", "2", "2"]


def test_interrupted_runtime_exits_130_keeping_the_models_measured(tmp_path, stub_timing):
    stub_timing.interrupt_at = 1  # the second model
    result = CliRunner().invoke(main, ["runtime", "--scale", "0.05", "--repeats", "2", "--model", "DeepLab@V",
                                       "--model", "R-FCN", "--results-dir", str(tmp_path)])
    code = "KeyboardInterrupt" if isinstance(result.exception, KeyboardInterrupt) else result.exit_code
    assert code == 130
    out_csv = tmp_path / "table4_runtime_cpu_scale0.05.csv"
    assert [(r["model"], r["variant"]) for r in read(out_csv)] == [("DeepLab@V", "plain"), ("DeepLab@V", "deformable")]
    assert f"interrupted: the models measured so far are in {out_csv}" in result.output


def test_runtime_bad_weights_is_a_usage_error_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    result = CliRunner().invoke(main, ["runtime", "--scale", "0.05", "--repeats", "2", "--model", "R-FCN",
                                       "--weights", str(bad), "--results-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Invalid value for --weights" in result.output, result.output
    assert "not a weights-only PyTorch checkpoint" in result.output
    assert not (tmp_path / "out").exists()


def test_params_csv_records_its_provenance(tmp_path):
    result = CliRunner().invoke(main, ["runtime", "--params-only", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = read(tmp_path / "table4_params.csv")
    assert len(rows) == 10 and all(r["git_commit"] and r["torch"] == torch.__version__ and r["date"] for r in rows)
    assert all(r["command"].startswith("python ") or r["command"].startswith("dcnbench ") for r in rows)


# ---------------------------------------------------------------------------------------------
# dcnbench table 4


def test_table4_refuses_a_csv_that_is_not_a_runtime_csv(tmp_path):
    other = tmp_path / "ops_cpu.csv"
    other.write_text("op,implementation,shape,ms\ndeform_conv2d,F.conv2d,res5,1.0\n")
    result = CliRunner().invoke(main, ["table", "4", "--results", str(other), "--out", str(tmp_path / "tables")])
    assert result.exit_code == 2 and "Invalid value for --results" in result.output
    assert "not a `dcnbench runtime` CSV: it has no model, variant, net_forward_s, runtime_s" in result.output


def test_table4_of_a_scaled_csv_never_replaces_the_paper_size_markdown(tmp_path):
    scaled = tmp_path / "table4_runtime_cpu_scale0.25.csv"
    scaled.write_text("model,variant,device,net_forward_s,runtime_s,repeats,scale\n"
                      "R-FCN,plain,cpu,0.04,0.05,2,0.25\nR-FCN,deformable,cpu,0.05,0.06,2,0.25\n")
    out = tmp_path / "tables"
    result = CliRunner().invoke(main, ["table", "4", "--results", str(scaled), "--format", "markdown",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["table4_cpu_scale0.25.md"]
    assert "0.0500 (×1.250)" in (out / "table4_cpu_scale0.25.md").read_text()


def test_bench_ops_interrupted_exits_130(tmp_path, monkeypatch):
    """Ctrl-C: the passes kept are reported by the benchmark itself; the command exits 130, not 1."""
    import dcnbench.bench.ops as bench_ops

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_ops, "run_ops_benchmark", interrupted)
    result = CliRunner().invoke(main, ["bench", "ops", "--out", str(tmp_path), "--shapes", "x=1,2,4,4,2"])
    assert result.exit_code == 130


def test_the_memory_case_name_is_a_timed_shape_only_without_the_memory_case(tmp_path):
    """small-b64 with its own dims may be timed (scripts/device_check.sh does, on CUDA), but not in a
    CPU run that also measures the memory case under that name: two kinds of rows of one shape."""
    result = CliRunner().invoke(main, ["bench", "ops", "--out", str(tmp_path / "out"), "--threads", "1",
                                       "--shapes", "small-b64=64,64,48,48,64,2"])
    assert result.exit_code == 2 and "small-b64 is the memory case" in result.output and "--no-memory" in result.output
    assert not (tmp_path / "out").exists()


def test_time_case_rotates_which_implementation_runs_first():
    """Each implementation runs at every place of a round in turn: with a fixed order the one timed
    right after F.conv2d came out slower (the modulated op's forward 10% faster than the plain one's)."""
    calls = []
    impls = {name: (lambda backward, name=name: lambda: calls.append(name)) for name in "abcd"}
    case = ops.Case("deform_conv2d", "tiny", "", "a", impls)
    result = ops.time_case(case, False, "cpu", repeats=8, warmup=0, budget_s=60.0)
    rounds = ["".join(calls[i:i + 4]) for i in range(0, 32, 4)]
    assert rounds == ["abcd", "bcda", "cdab", "dabc"] * 2
    assert {name: n for name, (_, n) in result.items()} == dict.fromkeys("abcd", 8)


def test_memory_case_child_ends_when_bench_ops_is_killed(tmp_path):
    """SIGTERM to `bench ops` while a memory case runs left the case's process running as an orphan
    (it runs up to minutes); the child now ends itself within a second of its parent's end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import dcnbench.bench.ops as ops
        ops._MEMORY_SCRIPT += "\\nimport os\\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\\ntime.sleep(60)\\n"
        ops.memory_case("inputs-only", 1, (1, 4, 4, 4, 4, 1))
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the memory case never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:  # gone, or a zombie (ended, not yet reaped by its new parent)
            if "\tZ" in Path(f"/proc/{child}/status").read_text().split("State:")[1].splitlines()[0]:
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the memory case outlived bench ops")
