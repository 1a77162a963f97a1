"""Training under torchrun (gloo on the CPU): N processes match 1, a dead rank ends the job cleanly.

Tolerance of the 1-vs-2-process comparison: with frozen BatchNorm (as the paper tier trains) the
two runs see the same global batches and the same flips, and DDP averages the per-rank gradients,
so they differ only in float summation order (gradient all-reduce, loss means over two halves of
the batch) -- 1e-3 relative on the losses and on mIoU covers that with a wide margin (measured: equal
to the 4 logged digits), while e.g. a batch not split over the ranks moves the second loss by 2%.
With plain BatchNorm each rank normalises by its own half batch, a different computation (the
losses differ by up to ~10% after 6 iterations): no such bound.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rich.console import Console

from dcnbench.report.tables import load_ours
from dcnbench.runner import distributed as dist
from dcnbench.runner import sweep
from dcnbench.runner.ablate import ablation_cells
from dcnbench.runner.results import append_row, processes, read_rows

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SMOKE_CELL = textwrap.dedent("""
    import io, json, sys
    import torch
    from dcnbench.runner import distributed as dist
    from dcnbench.runner.ablate import ablation_cells
    from dcnbench.runner.train import run_cell

    dist.init_from_env()
    torch.set_num_threads(1)
    cell = ablation_cells(1, "smoke", ["deeplab"])[3]  # res5a-c: deformable res5
    cell.config["model"]["frozen_bn"] = True
    cell.config["train"]["lr"] = 0.3  # frozen (identity) BN from scratch learns in 6 iterations only at a high lr
    log = io.StringIO()
    metrics = run_cell(cell.config, log)
    losses = [float(line.split()[3]) for line in log.getvalue().splitlines() if line.startswith("iter")]
    if dist.is_main():
        with open(sys.argv[1], "w") as f:
            json.dump({"miou": metrics["miou"], "losses": losses, "device": metrics["device"]}, f)
    dist.shutdown()
""")


def _run_smoke_cell(tmp_path: Path, nproc: int) -> dict:
    script, out = tmp_path / "cell.py", tmp_path / f"metrics{nproc}.json"
    script.write_text(SMOKE_CELL)
    subprocess.run(TORCHRUN + ["--nproc-per-node", str(nproc), str(script), str(out)], check=True,
                   capture_output=True, timeout=180)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path):
    one, two = _run_smoke_cell(tmp_path, 1), _run_smoke_cell(tmp_path, 2)
    assert (one["device"], two["device"]) == ("cpu x1", "cpu x2")
    assert len(one["losses"]) == len(two["losses"]) == 6
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)
    assert two["miou"] == pytest.approx(one["miou"], rel=1e-3)
    assert one["losses"][-1] < one["losses"][0]  # it trained


FIXED_PROPOSALS_CELL = textwrap.dedent("""
    import io, sys
    from pathlib import Path
    import torch
    from dcnbench.runner import distributed as dist
    from dcnbench.runner.ablate import ablation_cells
    from dcnbench.runner.train import run_cell

    dist.init_from_env()
    torch.set_num_threads(1)
    cell = ablation_cells(1, "smoke", ["rfcn"], variants=["res5a-c"])[0]
    cell.config["train"]["fixed_proposals"] = True
    cell.config["model"]["frozen_bn"] = True  # as the paper tier: 1 and 2 processes then train alike
    log = io.StringIO()
    metrics = run_cell(cell.config, log, None, Path(sys.argv[1]))
    Path(sys.argv[1], f"log{dist.rank()}.txt").write_text(log.getvalue())
    dist.shutdown()
""")


@pytest.mark.slow
def test_the_rpn_stage_trains_and_proposes_for_every_image_under_two_processes(tmp_path):
    """Under torchrun both ranks train the RPN stage together and each proposes for its shard; rank 0
    caches every image's proposals, in dataset order: the 1-process stage's, up to float summation
    order (frozen BatchNorm, as the module docstring says; measured: 3e-5 px on the best ones)."""
    import torch

    script = tmp_path / "cell.py"
    script.write_text(FIXED_PROPOSALS_CELL)
    for nproc in (1, 2):
        subprocess.run(TORCHRUN + ["--nproc-per-node", str(nproc), str(script), str(tmp_path / f"p{nproc}")],
                       check=True, capture_output=True, timeout=180)
    (one,), (two,) = (list((tmp_path / f"p{n}").glob("rpn_*")) for n in (1, 2))
    assert one.name == two.name and {p.name for p in two.iterdir()} >= {"proposals.pt", "rpn.pt", "rpn.log"}
    assert all("training the RPN stage" in (tmp_path / "p2" / f"log{r}.txt").read_text() for r in (0, 1))
    boxes1, boxes2 = (torch.load(d / "proposals.pt", weights_only=True) for d in (one, two))
    def same(a, b):  # a's 20 best are among b's 40 best: near-equal scores of the barely trained RPN swap places
        return bool(((a[:20, None] - b[None, :40]).abs().amax(-1).amin(1) < 1e-2).all())

    for split, size in (("train", 32), ("val", 16)):
        assert len(boxes1[split]) == len(boxes2[split]) == size
        assert all(same(a, b) for a, b in zip(boxes1[split], boxes2[split]))
        assert not any(same(a, b) for a, b in zip(boxes1[split], boxes1[split][1:]))  # a shuffle would show


def _children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in kids.read_text().split()] if kids.exists() else []


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank below ``launcher`` (dcnbench -> torchrun -> workers)."""
    stack = _children(launcher)
    while stack:
        pid = stack.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            return pid
        stack += _children(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs /proc/<pid>/task/<tid>/children to find the worker processes")
def test_killed_rank_ends_the_job_and_rerun_resumes(tmp_path):
    """SIGKILL rank 1 mid-sweep: the job exits non-zero soon, with torchrun's failure report, the CSV
    holds only whole rows, and the same command resumes and finishes every cell exactly once."""
    csv_path = tmp_path / "table1_smoke.csv"
    cmd = [sys.executable, "-m", "dcnbench.cli", "ablate", "--table", "1", "--tier", "smoke", "--task", "deeplab",
           "--seeds", "2", "--out", str(tmp_path), "--nproc", "2"]
    env = {**os.environ, "DCNBENCH_DIST_TIMEOUT_S": "60"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not read_rows(csv_path):
            time.sleep(0.05)
        victim = _worker_of_rank(proc.pid, 1)
        assert victim is not None, "no rank-1 worker found"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60
    assert "ChildFailedError" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    rows = read_rows(csv_path)
    assert 1 <= len(rows) < 10
    assert all(r["torch"] and r["device"] == "cpu x2" for r in rows)  # last column present: no torn row
    assert all(r["command"].endswith("--nproc 2") and "--jobs" not in r["command"] for r in rows)  # as typed
    assert not list(tmp_path.glob("*.tmp"))
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    rows = read_rows(csv_path)
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, str(s)) for v in ["none", "res5c", "res5b-c", "res5a-c", "res5+res4b20-22"] for s in range(2))


def test_rows_count_as_done_or_reusable_only_for_the_same_process_count(tmp_path, monkeypatch):
    """With plain BatchNorm a run's numbers depend on the process count, so a 2-process sweep neither
    resumes from nor reuses a 1-process row (and its summary leaves it out); 1-process sweeps do, as
    before. Fabricated rows; the training is a stub."""
    assert [processes({"device": d}) for d in ("cpu", "cuda:0", "cpu x1", "cuda:0 x8", "")] == [1, 1, 1, 8, 1]
    (none,) = ablation_cells(1, "smoke", ["deeplab"], variants=["none"])
    (atrous2,) = ablation_cells(3, "smoke", ["deeplab"], variants=["atrous-2"])
    assert none.run_hash == atrous2.run_hash
    t1, t3, console = tmp_path / "table1_smoke.csv", tmp_path / "table3_smoke.csv", Console(quiet=True)
    append_row(t1, sweep._row(none, {"miou": 10.0, "wall_s": 1.0, "device": "cpu", "threads": 1}, "abc"))

    def fake_run(config, log_path, checkpoint, threads, proposals_dir):
        return {"miou": 20.0, "wall_s": 1.0, "device": f"cpu x{dist.world_size()}", "threads": threads}

    monkeypatch.setattr(sweep, "_run_in_worker", fake_run)
    assert sweep.run_sweep([none], t1, tmp_path / "logs", tmp_path / "ckpt", console=console).skipped == 1
    sweep._reuse_identical_runs([atrous2], t3, [t1], console)
    assert [r["device"] for r in read_rows(t3)] == ["cpu"]

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    t3.unlink()
    sweep._reuse_identical_runs([atrous2], t3, [t1], console)
    assert read_rows(t3) == []
    folders = (tmp_path / "logs", tmp_path / "ckpt", console, "abc", tmp_path / "proposals")
    report = sweep._run_sweep_distributed([none], t1, *folders)
    assert (report.ran, report.skipped) == (1, 0)
    assert [r["device"] for r in read_rows(t1)] == ["cpu", "cpu x2"]
    assert sweep._run_sweep_distributed([none], t1, *folders).skipped == 1
    sweep._reuse_identical_runs([atrous2], t3, [t1], console)
    assert [(r["device"], r["miou"]) for r in read_rows(t3)] == [("cpu x2", "20")]
    stats = sweep.summarize(t1, [none]).set_index("metric")
    assert (stats.loc["miou", "mean"], stats.loc["miou", "count"]) == (20.0, 1)
    with pytest.raises(ValueError, match=r"runs by \[1, 2\] processes"):  # `dcnbench table` neither averages them
        load_ours(1, "smoke", t1)


def test_helpers_are_the_identity_without_a_process_group(monkeypatch):
    assert not dist.is_distributed() and (dist.rank(), dist.world_size()) == (0, 1)
    assert dist.gather("x") == ["x"] and dist.broadcast(3) == 3
    assert dist.shard(5) == [0, 1, 2, 3, 4] and dist.per_rank_batch(3) == 3
    parts = [[0, 3, 6], [1, 4], [2, 5]]  # shard(7) of ranks 0..2
    assert dist.unshard(parts) == list(range(7))
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="batch_size 4 is the global batch and must divide evenly over 3"):
        dist.per_rank_batch(4)
    assert dist.per_rank_batch(6) == 2


def test_dilation_stats_gathered_from_shards_summarise_like_one_pass():
    import torch

    from dcnbench.evaluation.dilation import DilationStats

    torch.manual_seed(0)
    eff = torch.rand(4, 6, 6) * 3
    area = torch.zeros(4, 12, 12)
    area[:, :6, :6], area[:2, 6:, 6:], area[2:, 8:, :4] = 36.0, 400.0, 900.0
    objects = [torch.tensor([36.0, 400.0]), torch.tensor([36.0, 900.0])]
    whole, halves = DilationStats(), [DilationStats(), DilationStats()]
    for i, half in enumerate(halves):
        for j in (2 * i, 2 * i + 1):
            whole.update("res5a", eff[j:j + 1], area[j:j + 1], objects[i], stride=2)  # 12 px maps, 6 cells: stride 2
            half.update("res5a", eff[j:j + 1], area[j:j + 1], objects[i], stride=2)
    merged = DilationStats.merged(halves).summary()
    expected = whole.summary()
    assert merged[["category", "count"]].equals(expected[["category", "count"]])
    assert merged["mean"].tolist() == pytest.approx(expected["mean"].tolist(), nan_ok=True)
    assert DilationStats.merged(halves[:1]).summary()["count"].sum() < expected["count"].sum()


@pytest.mark.parametrize("rank,said", [("0", True), ("1", False)])
def test_ctrl_c_under_torchrun_is_reported_by_rank_0_only(rank, said, monkeypatch, capsys):
    """Every rank gets Ctrl-C: each printed the same "interrupted" line (twice at --nproc 2)."""
    from dcnbench.cli import _exit_130_on_interrupt

    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as info, _exit_130_on_interrupt("the finished runs are kept"):
        raise KeyboardInterrupt
    assert info.value.code == 130
    assert ("interrupted: the finished runs are kept" in capsys.readouterr().err) == said
