"""`dcnbench runtime`: a tiny --scale run writes Table 4's CSVs; resume; the paper's numbers."""

import csv

import pytest
import torch
from click.testing import CliRunner

from dcnbench.cli import main
from dcnbench.runtime import (
    MIN_ROUNDS_FOR_INTERVAL,
    TABLE4_MODELS,
    build_twins,
    kernel_weight_order,
    overhead_rows,
    paired_ratio,
    read_paper_table4,
    time_models,
    verdict,
)

REQUIRED = ["model", "variant", "device", "net_forward_s", "runtime_s", "repeats"]
PROVENANCE = ["backend", "threads", "machine", "torch", "git_commit", "date", "command"]


def read(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_tiny_scale_run_writes_its_own_csv_and_resumes(tmp_path, monkeypatch):
    """A scaled run goes to table4_runtime_cpu_scale<s>.csv: it never mixes with the paper-size CSV."""
    args = ["runtime", "--scale", "0.05", "--repeats", "2", "--model", "R-FCN",
            "--results-dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["/usr/bin/dcnbench", *args])  # as the CLI is started
    commits = iter(f"commit{i}" for i in range(100))  # a tree that changes between reads
    monkeypatch.setattr("dcnbench.runner.results.git_commit", lambda: next(commits))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "table4_runtime_cpu.csv").exists()
    columns, rows = read(tmp_path / "table4_runtime_cpu_scale0.05.csv")
    assert columns[:6] == REQUIRED and set(PROVENANCE) <= set(columns)
    assert [(r["model"], r["variant"]) for r in rows] == [("R-FCN", "plain"), ("R-FCN", "deformable")]
    for r in rows:
        assert r["device"] == "cpu" and r["repeats"] == "2" and r["scale"] == "0.05"
        assert 0 < float(r["net_forward_s"]) <= float(r["runtime_s"])
        assert len(r["runtime_all_s"].split()) == 2
        # every time to the microsecond, so ~10 ms GPU forwards keep their ratios' third decimal
        times = [r["net_forward_s"], r["runtime_s"], *r["net_forward_all_s"].split(), *r["runtime_all_s"].split()]
        assert all(len(t.split(".")[1]) == 6 for t in times)
        assert r["git_commit"] == "commit0" and r["machine"] and r["backend"] in ("reference", "native")  # at the start
        assert r["command"] == f"dcnbench runtime --scale 0.05 --repeats 2 --model R-FCN --results-dir {tmp_path}"
    assert rows[0]["input_hw"] == "30x40" and rows[0]["raw_hw"] == "375x500" and rows[0]["proposals"] == "300"
    assert int(rows[1]["params"]) > int(rows[0]["params"])
    assert "R-FCN" in result.output and "1.182" in result.output  # the paper's R-FCN net-forward ratio
    assert "met" not in result.output.replace("met / not met", "")  # no verdict from 2 rounds at scale 0.05

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("already measured") == 1
    assert read(tmp_path / "table4_runtime_cpu_scale0.05.csv")[1] == rows


def test_params_only(tmp_path):
    result = CliRunner().invoke(main, ["runtime", "--params-only", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    columns, rows = read(tmp_path / "table4_params.csv")
    assert columns[:3] == ["model", "variant", "params"]  # then provenance: test_bench_review
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
    assert "paired_ratio_net_forward_s" not in rec  # no per-round times in these rows


def test_paired_ratio_is_the_median_of_round_ratios_with_an_interval_around_it():
    plain = [1.0, 2.0, 1.0, 1.5, 1.0]
    deformable = [1.1, 2.4, 1.05, 1.65, 1.3]  # round ratios 1.1, 1.2, 1.05, 1.1, 1.3
    median, low, high = paired_ratio(plain, deformable)
    assert abs(median - 1.1) < 1e-12
    assert 1.05 <= low <= median <= high <= 1.3
    assert paired_ratio(plain, deformable) == (median, low, high)  # seeded


def test_verdict_needs_the_whole_interval_on_one_side_of_the_paper():
    assert verdict(1.01, 1.06, 1.07) == "met"
    assert verdict(1.08, 1.12, 1.07) == "not met"
    assert verdict(1.03, 1.09, 1.07) == "unresolved"


def rfcn_rows(rounds, scale="1"):
    """R-FCN rows with ``rounds`` per-round times: deformable/plain ~1.10 net, ~1.30 runtime."""
    def times(base):
        return " ".join(f"{base + 0.01 * (i % 3):.2f}" for i in range(rounds))
    return [{"model": "R-FCN", "variant": "plain", "net_forward_s": "2.0", "runtime_s": "4.0", "scale": scale,
             "net_forward_all_s": times(2.0), "runtime_all_s": times(4.0)},
            {"model": "R-FCN", "variant": "deformable", "net_forward_s": "2.2", "runtime_s": "5.2", "scale": scale,
             "net_forward_all_s": times(2.2), "runtime_all_s": times(5.2)}]


def test_overhead_rows_carry_the_paired_ratio_and_verdict():
    (rec,) = overhead_rows(rfcn_rows(MIN_ROUNDS_FOR_INTERVAL))
    assert rec["verdict_net_forward_s"] == "met"  # ~1.10 against the paper's 1.18
    assert rec["verdict_runtime_s"] == "not met"  # ~1.30 against 1.14


def test_overhead_rows_give_no_interval_from_few_rounds_and_no_verdict_off_the_paper_sizes():
    (few,) = overhead_rows(rfcn_rows(MIN_ROUNDS_FOR_INTERVAL - 1))
    assert "paired_ratio_net_forward_s" not in few and "verdict_net_forward_s" not in few
    assert abs(few["ratio_net_forward_s"] - 1.1) < 1e-12  # the ratio of medians stays
    (scaled,) = overhead_rows(rfcn_rows(MIN_ROUNDS_FOR_INTERVAL, scale="0.5"))
    assert scaled["paired_ratio_net_forward_s"] > 1 and scaled["verdict_net_forward_s"] == ""


def test_time_models_alternates_which_model_runs_first():
    """Rounds run the models in turn, in reverse order every other round: each runs first in half."""
    calls = []

    class Stub(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward_raw(self, x):
            calls.append(self.name)
            return x

        def postprocess(self, out):
            return out

    raw = torch.zeros(3, 4, 4, dtype=torch.uint8)
    rounds = []
    times = time_models({"plain": Stub("plain"), "deformable": Stub("deformable")}, raw, (4, 4),
                        torch.device("cpu"), repeats=4, warmup=1, on_round=lambda: rounds.append(len(calls)))
    assert rounds == [2, 4, 6, 8, 10]  # progress after every round, warm-up included
    assert calls == ["plain", "deformable", "deformable", "plain", "plain", "deformable", "deformable", "plain",
                     "plain", "deformable"]
    assert all(len(net) == len(total) == 4 for net, total in times.values())


def test_table4_shows_the_newest_paper_size_rows_and_a_named_scaled_csv(tmp_path):
    """Table 4 never averages runs: per model and variant the newest row at the file's scale; a scaled
    run's own CSV is shown only when named, with its scale in the column."""
    from dcnbench.report.tables import build_table4

    header = "model,variant,device,net_forward_s,runtime_s,repeats,scale,date\n"
    (tmp_path / "table4_runtime_cpu.csv").write_text(
        header
        + "R-FCN,plain,cpu,0.20,0.30,15,1,2026-01-01T00:00:00Z\nR-FCN,deformable,cpu,0.25,0.33,15,1,2026-01-01T00:00:00Z\n"
        + "R-FCN,plain,cpu,0.04,0.05,2,0.25,2026-01-02T00:00:00Z\nR-FCN,deformable,cpu,0.05,0.06,2,0.25,2026-01-02T00:00:00Z\n"
        + "R-FCN,plain,cpu,0.30,0.40,45,1,2026-01-03T00:00:00Z\nR-FCN,deformable,cpu,0.33,0.44,45,1,2026-01-03T00:00:00Z\n")
    scaled = tmp_path / "table4_runtime_cpu_scale0.25.csv"
    scaled.write_text(header + "R-FCN,plain,cpu,0.04,0.05,2,0.25,2026-01-02T00:00:00Z\n"
                      + "R-FCN,deformable,cpu,0.05,0.06,2,0.25,2026-01-02T00:00:00Z\n")

    def ours(rendered, model_row):
        rows = dict(rendered.rows)
        fwd = next(i for i, h in enumerate(rendered.header) if "forward" in h[0] and "ours" in h[1])
        return rendered.header[fwd][1], rows[model_row][fwd]

    table = build_table4(tmp_path)
    assert ours(table, "R-FCN") == ("ours [cpu]", "0.3000")
    assert ours(table, "R-FCN, Ours") == ("ours [cpu]", "0.3300 (×1.100)")
    assert any("4 row(s) left out" in note for note in table.footnotes)
    assert ours(build_table4(runtime_csv=scaled), "R-FCN, Ours") == ("ours [cpu, scale 0.25]", "0.0500 (×1.250)")


def test_runtime_on_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(main, ["runtime", "--device", "cuda", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value for --device" in result.output
    assert "CUDA is not available" in result.output and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"table,tier,task\n1,smoke,deeplab\n"],
                         ids=["not-utf-8", "another-csv"])
def test_runtime_refuses_a_file_in_its_results_dir_that_is_not_a_runtime_csv(tmp_path, content):
    """The runtime CSV it would resume is unreadable or of another kind: a usage error naming
    --results-dir, before anything is timed (a KeyError / UnicodeDecodeError traceback before)."""
    (tmp_path / "table4_runtime_cpu_scale0.05.csv").write_bytes(content)
    result = CliRunner().invoke(main, ["runtime", "--scale", "0.05", "--repeats", "2", "--model", "DeepLab@V",
                                       "--results-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--results-dir'" in result.output and "runtime CSV" in result.output


def test_a_bad_backend_in_the_environment_is_a_usage_error(monkeypatch, tmp_path):
    """DCNBENCH_BACKEND=bogus: every command stops with a usage error naming the variable and the
    choices (runtime gave a traceback, ablate failed every cell); the CLI's list is the library's."""
    from dcnbench.ops.dispatch import BACKENDS

    monkeypatch.setenv("DCNBENCH_BACKEND", "bogus")
    result = CliRunner().invoke(main, ["runtime", "--params-only", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "DCNBENCH_BACKEND" in result.output and "'bogus'" in result.output
    assert all(name in result.output for name in BACKENDS)


def test_command_line_reads_as_typed(monkeypatch):
    from dcnbench.runner.results import command_line

    for argv0 in ("/usr/local/bin/dcnbench", "/src/dcnbench/dcnbench/cli.py"):
        monkeypatch.setattr("sys.argv", [argv0, "runtime", "--model", "class-aware RPN"])
        assert command_line() == "dcnbench runtime --model 'class-aware RPN'"
    monkeypatch.setattr("sys.argv", ["bench.py", "--x"])
    assert command_line() == "python bench.py --x"
    # A rank that `ablate --nproc 2` launched through torchrun records the command typed, not its relaunch.
    monkeypatch.setenv("DCNBENCH_LAUNCHED_AS", "dcnbench ablate --table 1 --nproc 2")
    monkeypatch.setattr("sys.argv", ["/src/dcnbench/dcnbench/cli.py", "ablate", "--table", "1", "--jobs", "1"])
    assert command_line() == "dcnbench ablate --table 1 --nproc 2"


def test_runtime_refuses_a_thread_count_torch_cannot_take(tmp_path):
    """--threads 99999999999 overflowed inside torch.set_num_threads (a traceback, exit 1)."""
    result = CliRunner().invoke(main, ["runtime", "--threads", "99999999999", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value for '--threads'" in result.output


def test_runtime_times_deformable_convs_with_weights_in_the_cpu_kernels_order():
    """The runtime benchmark stores the deformable twin's DeformConv2d weights channels-last on the
    CPU (the kernels' order; DeformConv2d's weight is standard like torchvision's), values and
    outputs unchanged; their offset convs and the plain twin keep their layout."""
    from dcnbench.ops import DeformConv2d

    twins = build_twins("deeplab", {"backbone": "scaled", "blocks": [1, 1, 1, 3], "width": 8})
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        want = {name: model(x) for name, model in twins.items()}
        for name, model in twins.items():
            kernel_weight_order(model)
            torch.testing.assert_close(model(x), want[name], rtol=0, atol=0)
    deformable = [m for m in twins["deformable"].modules() if isinstance(m, DeformConv2d)]
    assert len(deformable) == 3 and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in deformable)
    assert all(m.offset_conv.weight.is_contiguous() for m in deformable)
    assert all(p.is_contiguous() for p in twins["plain"].parameters())


def test_runs_into_one_folder_keep_each_others_rows_and_weights_are_part_of_the_key(tmp_path, monkeypatch):
    """Two runtime runs into one folder at once lost rows: each wrote back the rows it had read at
    its start. Rows are now merged under the folder's lock when written: a row another run wrote
    meanwhile (injected here while this run times its models) is kept. A run with --weights is
    another measurement than one with the seed-0 initialisation: it was skipped as "already
    measured" and nothing in the CSV told them apart; the file's SHA-256 is a column and in the key."""
    import torchvision

    import dcnbench.runtime as runtime
    from dcnbench.runner.train import file_sha256

    out_csv = tmp_path / "table4_runtime_cpu_scale0.05.csv"
    foreign = {c: "" for c in runtime.RUNTIME_COLUMNS} | {
        "model": "R-FCN", "variant": "plain", "device": "cpu", "scale": "0.05", "repeats": "2", "backend": "native",
        "threads": "1", "net_forward_s": "1.0", "runtime_s": "1.0"}
    timed = runtime.time_models

    def time_models_while_another_run_writes(*args, **kwargs):
        runtime._store_rows(out_csv, [foreign])
        return timed(*args, **kwargs)

    monkeypatch.setattr(runtime, "time_models", time_models_while_another_run_writes)
    runtime.run_runtime(out_csv, scale=0.05, repeats=2, models=["DeepLab@V"], log=lambda _: None)
    first = read(out_csv)[1]
    assert {(r["model"], r["variant"]) for r in first} == {("R-FCN", "plain"), ("DeepLab@V", "plain"),
                                                          ("DeepLab@V", "deformable")}
    assert all(r["weights_sha256"] == "" for r in first)
    weights = tmp_path / "r101.pth"
    torch.save(torchvision.models.resnet101().state_dict(), weights)
    monkeypatch.setattr(runtime, "time_models", timed)
    logs = []
    new = runtime.run_runtime(out_csv, scale=0.05, repeats=2, models=["DeepLab@V"], weights=str(weights),
                              log=logs.append)
    assert not any("already measured" in line for line in logs)
    assert [r["weights_sha256"] for r in new] == [file_sha256(weights)] * 2
    rows = read(out_csv)[1]
    assert len(rows) == 5 and first[0] in rows


def test_table4_says_when_its_rows_come_from_runs_of_different_settings(tmp_path):
    """Newest rows per model and variant may come from runs at other thread counts (or rounds,
    backends, weights): the table showed them side by side without a word; a note now names the
    settings that differ. Rows of one setting get no note."""
    from dcnbench.report.tables import build_table4

    header = "model,variant,device,net_forward_s,runtime_s,repeats,scale,backend,threads,date\n"
    csv_path = tmp_path / "table4_runtime_cpu.csv"
    rows = ("R-FCN,plain,cpu,0.20,0.30,15,1,native,1,2026-01-01T00:00:00Z\n"
            "R-FCN,deformable,cpu,0.25,0.33,15,1,native,1,2026-01-01T00:00:00Z\n")
    csv_path.write_text(header + rows)
    assert not any("different settings" in note for note in build_table4(tmp_path).footnotes)
    csv_path.write_text(header + rows + "DeepLab@V,plain,cpu,0.30,0.40,15,1,native,1024,2026-01-03T00:00:00Z\n"
                        "DeepLab@V,deformable,cpu,0.33,0.44,15,1,native,1024,2026-01-03T00:00:00Z\n")
    notes = [n for n in build_table4(tmp_path).footnotes if "different settings" in n]
    assert len(notes) == 1 and "(threads 1, 1024)" in notes[0], notes


def test_runtime_refuses_a_nan_scale(tmp_path):
    """click's FloatRange lets NaN through (it compares false): --scale nan reached round() and
    raised a traceback; a usage error now."""
    result = CliRunner().invoke(main, ["runtime", "--scale", "nan", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value for '--scale': must be a number, got nan" in result.output


@pytest.mark.parametrize("line", ["R-FCN,plain,cpu,x,2,native", "R-FCN,plain"], ids=["scale-not-a-number", "short"])
def test_runtime_names_a_hand_edited_row_it_cannot_resume_from(tmp_path, line):
    """A row whose key cannot be read (a scale that is not a number, a short line) is a usage error
    naming --results-dir and the line, before anything is timed (a ValueError / TypeError traceback)."""
    (tmp_path / "table4_runtime_cpu_scale0.05.csv").write_text(
        "model,variant,device,scale,repeats,backend\nR-FCN,deformable,cpu,0.05,2,native\n" + line + "\n")
    result = CliRunner().invoke(main, ["runtime", "--scale", "0.05", "--repeats", "2", "--model", "DeepLab@V",
                                       "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--results-dir" in result.output and "line 3 is not a runtime row" in result.output


def test_runtime_keeps_columns_a_user_added_to_its_csv(tmp_path):
    """Rows are rewritten with the runtime columns and any column the user added (it was dropped)."""
    import dcnbench.runtime as runtime

    path = tmp_path / "table4_runtime_cpu.csv"
    path.write_text("model,variant,device,scale,repeats,backend,note\nR-FCN,plain,cpu,1,2,native,rerun me\n")
    runtime._store_rows(path, [{"model": "R-FCN", "variant": "deformable", "device": "cpu", "scale": "1",
                                "repeats": "2", "backend": "native"}])
    columns, rows = read(path)
    assert columns[-1] == "note" and [r["note"] for r in rows] == ["rerun me", ""]
