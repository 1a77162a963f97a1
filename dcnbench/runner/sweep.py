"""Run a list of cells: resume, parallel worker processes, progress with ETA, one log per run."""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import distributed as dist
from .experiment import Cell
from .parent import exit_with_parent
from .results import (KEY_COLUMNS, PROVENANCE_COLUMNS, append_row, claim_file, cpu_budget, finished_keys, git_commit,
                      processes, provenance, read_rows)


@dataclass
class SweepReport:
    ran: int
    skipped: int
    failed: list[tuple[str, str]]  # (cell name, log path)


def _run_in_worker(config: dict, log_path: Path, checkpoint: Path, threads: int, proposals_dir: Path) -> dict:
    """Worker entry: fixed thread count, log to file, return metrics + run provenance."""
    import torch

    from .train import run_cell

    torch.set_num_threads(threads)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            metrics = run_cell(config, log, checkpoint, proposals_dir)
        except Exception:
            log.write(traceback.format_exc())
            raise
    metrics["wall_s"] = round(time.perf_counter() - start, 2)
    metrics["threads"] = threads
    return metrics


def run_sweep(cells: list[Cell], csv_path: Path, log_dir: Path, checkpoint_dir: Path, jobs: int = 1,
              console: Console | None = None, reuse_from: list[Path] = (),
              proposals_dir: Path | None = None) -> SweepReport:
    """Run every cell not already in ``csv_path``; append one row per finished run.

    Only rows run by as many processes as this sweep (``dist.world_size()``) count, here and below:
    with plain BatchNorm a run's numbers depend on the process count (README, distributed training).
    A cell whose run (same run hash and seed) already finished in one of the ``reuse_from`` CSVs is
    not run again: that row is copied with this cell's table, variant and config hash, its own
    provenance kept, and ``reused_from`` naming the source. Each run logs to ``log_dir/<cell>.log``
    and saves its weights to ``checkpoint_dir/<cell>.pt``; cells with fixed proposals share their RPN
    stages in ``proposals_dir`` (default ``checkpoint_dir/proposals``). Cells run in ``jobs`` spawned worker
    processes with ``cpu_budget() // jobs`` threads apiece (:func:`~.results.cpu_budget`); only this
    process writes the CSV. A failing cell is logged and reported; the others go on. A worker that
    dies (killed, out of memory) takes the runs in flight with it: each of them is rerun alone, and
    the one whose worker dies alone fails. A cell that another sweep into the same folder is running
    (it holds a lock on the cell's log) or has finished meanwhile is skipped.
    Rows record the git commit of the checkout as the sweep started (the cells' configs were read then).
    """
    console = console or Console()
    commit = git_commit()
    proposals_dir = proposals_dir or checkpoint_dir / "proposals"
    if dist.is_main():
        _reuse_identical_runs(cells, csv_path, reuse_from, console)
    if dist.is_distributed():
        return _run_sweep_distributed(cells, csv_path, log_dir, checkpoint_dir, console, commit, proposals_dir)
    done = finished_keys(_same_world(read_rows(csv_path)))
    todo = [c for c in cells if c.key not in done]
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, cpu_budget() // jobs)
    failed: list[tuple[str, str]] = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    queue = [(cell, False) for cell in todo]  # (cell, alone): rerun by itself after a worker died beside it
    pending: dict = {}  # future -> (cell, log path, alone, claim)
    elsewhere: list[str] = []  # cells another sweep into this folder ran or is running
    pool = worker_pool(jobs)
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task(f"{csv_path.stem}", total=len(todo))
            while queue or pending:
                broken = False
                while queue and len(pending) < jobs and not (pending and queue[0][1]):
                    cell, alone = queue.pop(0)
                    log_path = log_dir / f"{cell.name}.log"
                    claim = claim_file(log_path)
                    if claim is None or cell.key in finished_keys(_same_world(read_rows(csv_path))):
                        if claim is not None:
                            os.close(claim)
                        elsewhere.append(cell.name)
                        progress.console.print(f"skipped {cell.name}: another sweep into this folder "
                                               f"{'is running' if claim is None else 'has finished'} it")
                        progress.advance(bar)
                        continue
                    try:
                        future = pool.submit(_run_in_worker, cell.config, log_path,
                                             checkpoint_dir / f"{cell.name}.pt", threads, proposals_dir)
                    except BrokenProcessPool:  # a worker died since the last wait
                        os.close(claim)
                        queue.insert(0, (cell, alone))
                        broken = True
                        break
                    pending[future] = (cell, log_path, alone, claim)
                    if alone:
                        break
                in_flight = len(pending)
                finished, _ = wait(pending, return_when=FIRST_COMPLETED) if pending else (set(), set())
                if broken or any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                    broken = True  # a worker died (killed, out of memory, crashed): every run in flight ends
                    finished, _ = wait(set(pending))
                for future in finished:
                    cell, log_path, alone, claim = pending.pop(future)
                    os.close(claim)  # the run is over (a rerun claims its cell anew)
                    try:
                        metrics = future.result()
                    except BrokenProcessPool:
                        if in_flight > 1 and not alone:  # not known whose worker died: rerun each alone
                            queue.insert(0, (cell, True))
                            continue
                        why = "its worker process died (killed, e.g. for lack of memory, or crashed)"
                        with open(log_path, "a") as log:
                            log.write(f"\n{why}\n")
                        failed.append((cell.name, str(log_path)))
                        console.print(f"[red]failed[/red] {cell.name}: {why} (log: {log_path})")
                    except Exception as exc:  # the run failed; its log has the traceback
                        failed.append((cell.name, str(log_path)))
                        console.print(f"[red]failed[/red] {cell.name}: {type(exc).__name__}: {exc} (log: {log_path})")
                    else:
                        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                          if isinstance(v, float) and k != "wall_s")
                        kept = "" if append_row(csv_path, _row(cell, metrics, commit)) else \
                            "; another sweep into this folder wrote this run first, its row is kept"
                        progress.console.print(f"done {cell.name}: {shown} ({metrics['wall_s']:.0f} s){kept}")
                    progress.advance(bar)
                if broken:
                    pool.shutdown()
                    pool = worker_pool(jobs)
    except BaseException:  # Ctrl-C or SIGINT to this process alone: stop the runs in flight (rerun next time)
        for worker in list((pool._processes or {}).values()):  # shutdown() alone would wait for them
            worker.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)
    return SweepReport(ran=len(todo) - len(failed) - len(elsewhere), skipped=len(cells) - len(todo) + len(elsewhere),
                       failed=failed)


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` spawned worker processes that end themselves when this process is gone (killed by
    SIGTERM or SIGKILL, which leave it no time to stop them), instead of running on as orphans."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


def _row(cell: Cell, metrics: dict, commit: str) -> dict:
    return {"table": cell.table, "tier": cell.tier, "task": cell.task, "variant": cell.variant,
            "seed": cell.seed, **metrics, "config_hash": cell.config_hash, "definition_hash": cell.definition_hash,
            "run_hash": cell.run_hash,
            **provenance(commit)}


def _same_world(rows: list[dict]) -> list[dict]:
    """The rows whose runs had as many processes as this one."""
    return [r for r in rows if processes(r) == dist.world_size()]


def _reuse_identical_runs(cells: list[Cell], csv_path: Path, sources: list[Path], console: Console) -> None:
    """Append, for each unfinished cell, the row of the identical run found in ``sources``."""
    done = finished_keys(_same_world(read_rows(csv_path)))
    finished = {}
    for source in sources:
        for row in _same_world(read_rows(source)):
            if row.get("run_hash") and not row.get("reused_from"):
                finished.setdefault((row["run_hash"], int(row["seed"])), (source, row))
    for cell in cells:
        if cell.key in done or (cell.run_hash, cell.seed) not in finished:
            continue
        source, row = finished[(cell.run_hash, cell.seed)]
        append_row(csv_path, {**row, "table": cell.table, "tier": cell.tier, "variant": cell.variant,
                              "config_hash": cell.config_hash, "definition_hash": cell.definition_hash,
                              "reused_from": f"{source.name}:{row['variant']}:seed{row['seed']}"})
        console.print(f"reused {cell.name}: the same run as {row['variant']} in {source.name}")


def _run_sweep_distributed(cells: list[Cell], csv_path: Path, log_dir: Path, checkpoint_dir: Path,
                           console: Console, commit: str, proposals_dir: Path) -> SweepReport:
    """Under torchrun: every rank runs the cells one after the other, in this process.

    Rank 0 reads the CSV and sends the todo list to all; it alone writes rows, checkpoints and
    ``<cell>.log`` (rank k logs to ``<cell>.rank<k>.log``). A failing cell ends the job (the rank
    exits non-zero and torchrun stops the others); rerunning resumes after the last whole row.
    """
    main = dist.is_main()
    done = dist.broadcast(finished_keys(_same_world(read_rows(csv_path))) if main else None)
    todo = [c for c in cells if c.key not in done]
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, cpu_budget() // dist.local_world_size())
    for i, cell in enumerate(todo, 1):
        log_path = log_dir / (f"{cell.name}.log" if main else f"{cell.name}.rank{dist.rank()}.log")
        metrics = _run_in_worker(cell.config, log_path, checkpoint_dir / f"{cell.name}.pt", threads, proposals_dir)
        if main:
            append_row(csv_path, _row(cell, metrics, commit))
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "wall_s")
            console.print(f"[{i}/{len(todo)}] done {cell.name}: {shown} ({metrics['wall_s']:.0f} s, "
                          f"{dist.world_size()} processes)")
        dist.barrier()
    return SweepReport(ran=len(todo), skipped=len(cells) - len(todo), failed=[])


def summarize(csv_path: Path, cells: list[Cell]) -> pd.DataFrame:
    """Mean, std and count over seeds per (task, variant) and metric, for rows of these cells' configs
    run by as many processes as this one."""
    rows = _same_world(read_rows(csv_path))
    wanted = {(c.task, c.variant, c.config_hash) for c in cells}
    rows = [r for r in rows if (r["task"], r["variant"], r["config_hash"]) in wanted]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    metrics = [c for c in frame.columns if c not in KEY_COLUMNS + PROVENANCE_COLUMNS]
    frame[metrics] = frame[metrics].apply(pd.to_numeric, errors="coerce")
    order = {(c.task, c.variant): i for i, c in enumerate(cells)}
    long = frame.melt(id_vars=["task", "variant"], value_vars=metrics, var_name="metric").dropna(subset=["value"])
    stats = long.groupby(["task", "variant", "metric"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    stats["order"] = [order.get((t, v), 0) for t, v in zip(stats["task"], stats["variant"])]
    return stats.sort_values(["order", "metric"]).drop(columns="order").reset_index(drop=True)
