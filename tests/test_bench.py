"""`dcnbench bench ops` (dcnbench.bench.ops) and the README blocks generated from its CSVs
(dcnbench.bench.report)."""

import csv
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dcnbench.bench.ops import FIELDS, parse_shape, run_ops_benchmark
from dcnbench.cli import main
from dcnbench.bench.report import main as bench_report_main
from dcnbench.bench.report import markers, read_rows, render_markdown, update_readme

ROOT = Path(__file__).resolve().parents[1]
CPU_CSV = "results/bench/ops_cpu.csv"
CUDA_CSV = "results/bench/ops_cuda.csv"


def _checkout_copy(tmp_path: Path) -> Path:
    """tmp_path as a checkout holding the committed benchmark CSVs."""
    for name in (CPU_CSV, CUDA_CSV):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    return tmp_path


def test_each_csv_owns_its_readme_block(tmp_path, monkeypatch):
    """Regenerating one CSV's block rewrites that block alone; text around and between blocks stays."""
    monkeypatch.chdir(_checkout_copy(tmp_path))
    readme = tmp_path / "README.md"
    cpu_start, cpu_end = markers(CPU_CSV)
    cuda_start, cuda_end = markers(CUDA_CSV)
    readme.write_text(f"intro\n{cpu_start}\nold cpu\n{cpu_end}\nbetween\n{cuda_start}\nold cuda\n{cuda_end}\nend\n")
    update_readme(readme, CUDA_CSV)
    text = readme.read_text()
    assert "old cpu" in text and "old cuda" not in text
    assert text.startswith("intro\n") and "\nbetween\n" in text and text.endswith("end\n")
    assert render_markdown(read_rows(CUDA_CSV), CUDA_CSV) in text


def test_the_readme_block_is_found_however_the_csv_path_is_typed(tmp_path, monkeypatch):
    """The block is named by the CSV's path relative to the README: a path typed as ./results/...,
    absolute, or from another folder replaced the block as typed only, and appended a second
    "## Performance" section otherwise."""
    root = _checkout_copy(tmp_path)
    start, end = markers(CPU_CSV)
    (root / "README.md").write_text(f"intro\n## Performance\n{start}\nold\n{end}\nend\n")
    (root / "sub").mkdir()
    for cwd, csv_arg, readme_arg in [(root, "./" + CPU_CSV, "README.md"), (root / "sub", "../" + CPU_CSV, "../README.md"),
                                     (ROOT, str(root / CPU_CSV), str(root / "README.md"))]:
        monkeypatch.chdir(cwd)
        bench_report_main([csv_arg, "--readme", readme_arg])
        text = (root / "README.md").read_text()
        assert text.count("## Performance") == 1 and text.count(start) == 1 and "old" not in text, text[:300]
        assert text.endswith(f"{end}\nend\n")


@pytest.mark.parametrize("content,error", [(None, "No such file"),
                                           ("table,variant\n1,none\n", "is not a 'dcnbench bench ops' CSV: no column op")])
def test_bench_report_names_a_csv_it_cannot_read(tmp_path, capsys, content, error):
    path = tmp_path / "x.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        bench_report_main([str(path)])
    assert exit_info.value.code == 2 and error in capsys.readouterr().err


def test_cuda_block_names_the_card_and_float32_mode_and_skips_cpu_targets(monkeypatch):
    monkeypatch.chdir(ROOT)
    cuda = render_markdown(read_rows(CUDA_CSV), CUDA_CSV)
    first = read_rows(CUDA_CSV)[0]
    assert first["machine"] in cuda and f"{first['float32_mode']} arithmetic" in cuda
    assert "Targets of issue 3" not in cuda
    assert "Targets of issue 3" in render_markdown(read_rows(CPU_CSV), CPU_CSV)


def test_bench_ops_writes_one_row_per_implementation_shape_and_pass(tmp_path):
    from rich.console import Console

    threads = torch.get_num_threads()
    path = run_ops_benchmark({"t": (2, 4, 6, 6, 4, 1)}, [1], "cpu", tmp_path, repeats=3, with_roi=False,
                             with_memory=False, console=Console(file=open("/dev/null", "w")))
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert path == tmp_path / "ops_cpu.csv"
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == FIELDS
        rows = list(reader)
    impls = {r["implementation"] for r in rows}
    assert impls == {"F.conv2d", "dcnbench-native", "dcnbench-native-modulated", "torchvision"}
    assert len(rows) == len(impls) * 2  # forward, forward+backward
    for r in rows:
        base = next(b for b in rows if b["implementation"] == "F.conv2d" and b["pass"] == r["pass"])
        # ratio = ms / baseline ms, up to the CSV's 3-decimal rounding of sub-millisecond times
        assert float(r["ratio_to_baseline"]) == pytest.approx(float(r["ms"]) / float(base["ms"]), rel=0.1)
        assert r["device"] == "cpu" and r["float32_mode"] == "" and r["git_commit"] and r["command"]


def test_bench_ops_tf32_is_a_cuda_option(tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        run_ops_benchmark({"t": (1, 2, 4, 4, 2, 1)}, [1], "cpu", tmp_path, repeats=3, with_roi=False,
                          with_memory=False, tf32=True)


def test_shape_parsing():
    assert parse_shape("r=1,2,3,4,5") == ("r", (1, 2, 3, 4, 5, 1))
    assert parse_shape(" r =1,2,3,4,5,2") == ("r", (1, 2, 3, 4, 5, 2))


@pytest.mark.parametrize("args,error", [
    (["--shapes", "foo"], "Invalid value for '--shapes': expected NAME=N,C,H,W,O[,DIL] with positive integers, got 'foo'"),
    (["--shapes", "a=1,2,3"], "Invalid value for '--shapes': expected NAME=N,C,H,W,O[,DIL]"),
    (["--shapes", "a=1,2,x,4,5"], "Invalid value for '--shapes': expected NAME=N,C,H,W,O[,DIL]"),
    (["--threads", "abc"], "Invalid value for '--threads': expected comma-separated positive integers, got 'abc'"),
    (["--threads", "1,0"], "Invalid value for '--threads': expected comma-separated positive integers, got '1,0'"),
    (["--device", "gpu"], "Invalid value for '--device': expected cpu, cuda or cuda:<index>, got 'gpu'"),
    (["--device", "cuda"], "Invalid value for '--device': CUDA is not available on this machine: no CUDA here (test)"),
    (["--tf32"], "Invalid value for --tf32: TF32 applies to CUDA devices only"),
])
def test_bench_ops_bad_options_are_usage_errors(tmp_path, monkeypatch, args, error):
    from dcnbench.ops import dispatch

    real = dispatch.backend_status
    monkeypatch.setattr(dispatch, "backend_status",
                        lambda name: (False, "no CUDA here (test)") if name == "cuda" else real(name))
    result = CliRunner().invoke(main, ["bench", "ops", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and error in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_terminal_tables_put_roi_pooling_under_its_own_header(monkeypatch):
    """The console shows RoI pooling in a table of its own (torchvision / native times and speed-ups),
    not under the conv table's "conv2d / native" and "ratio" columns."""
    from rich.console import Console

    from dcnbench.bench.report import CONV_HEADER, ROI_HEADER, render_tables

    monkeypatch.chdir(ROOT)
    rows = read_rows(CPU_CSV)
    conv, roi = render_tables(rows)
    assert [c.header for c in conv.columns] == CONV_HEADER
    assert [c.header for c in roi.columns] == ROI_HEADER
    console = Console(file=open("/dev/null", "w"), width=200, record=True)
    console.print(roi)
    shown = console.export_text()
    ps = next(r for r in rows if r["op"] == "deform_ps_roi_pool" and r["implementation"] == "dcnbench-native"
              and r["pass"] == "forward")
    assert f"{float(ps['speedup_vs_torchvision']):.2f}×" in shown
    assert not any("roi" in str(cell) for column in conv.columns for cell in column.cells)
