"""Results CSVs: one row per finished run, written atomically; provenance of every row.

Columns: the key (table, tier, task, variant, seed), the metrics of the run, then wall_s, device
(``cpu``, ``cuda:0``; ``cuda:0 x8`` under torchrun with 8 processes, see :func:`processes`), threads,
backend, config_hash, run_hash, reused_from (the CSV, variant and seed of the identical run a reused
row was copied from; empty for a run of its own), command (as typed), git_commit, date, machine, torch.
A row is only written when its run has finished, by rewriting the file to a temporary sibling and
``os.replace``-ing it, so a sweep killed at any moment leaves the previous complete file; the
read-modify-write holds a lock on the folder, so sweeps writing to one folder at once lose no row.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no folder lock
    fcntl = None

KEY_COLUMNS = ["table", "tier", "task", "variant", "seed"]
PROVENANCE_COLUMNS = ["wall_s", "device", "threads", "backend", "config_hash", "definition_hash", "run_hash",
                      "reused_from", "command",
                      "git_commit", "date", "machine", "torch"]


def git_commit() -> str:
    """Short commit of the dcnbench checkout, with ``+dirty`` when tracked files other than the
    outputs under ``results/`` have uncommitted changes. ``$DCNBENCH_GIT_COMMIT``, when set, is taken
    as it is: a copy of the tree without ``.git`` (a lent GPU machine) is told its commit."""
    if os.environ.get("DCNBENCH_GIT_COMMIT"):
        return os.environ["DCNBENCH_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_budget() -> int:
    """CPUs this process may use, which sweeps share out as threads: ``$OMP_NUM_THREADS`` when set,
    else the CPUs it may run on (``taskset``, cpusets), capped by a cgroup CPU quota (containers);
    ``os.cpu_count()`` counts the host's."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def machine() -> str:
    """CPU model and core count, e.g. ``Intel Xeon ... x2``."""
    return f"{cpu_model()} x{os.cpu_count()}"


LAUNCHED_AS = "DCNBENCH_LAUNCHED_AS"  # the command a torchrun relaunch (ablate --nproc) was typed as


def command_line() -> str:
    """This process's command as typed: ``dcnbench runtime --repeats 45`` under the CLI (whether
    started as ``dcnbench`` or ``python -m dcnbench.cli``), else ``python <argv>``; in a process
    that ``ablate --nproc`` launched through torchrun, the ``ablate --nproc`` command."""
    if os.environ.get(LAUNCHED_AS):
        return os.environ[LAUNCHED_AS]
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if prog.name == "dcnbench" or (prog.name == "cli.py" and prog.parent.name == "dcnbench"):
        return shlex.join(["dcnbench", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def provenance(commit: str | None = None) -> dict:
    """The run-independent provenance columns; ``commit``, when given, is the :func:`git_commit` a
    long job read when it started (the tree may change while it runs: a row records the code that
    ran it, not the checkout it was written from)."""
    return {
        "command": command_line(),
        "git_commit": git_commit() if commit is None else commit,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "torch": torch.__version__,
    }


class UnreadableCSV(ValueError):
    """A results file that cannot be read as CSV text (not UTF-8, unreadable, malformed quoting)."""


def read_rows(path: Path) -> list[dict]:
    """All rows of a results CSV (empty when nothing is there); UnreadableCSV naming the path when it
    cannot be read as one (a folder, not UTF-8, malformed)."""
    if not path.exists():
        return []
    if not path.is_file():
        raise UnreadableCSV(f"{path} is not a file")
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UnreadableCSV(f"{path} is not a readable CSV ({exc})") from exc


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Exclusive ``flock`` on ``folder`` (no lock file; a no-op without ``fcntl``)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def claim_file(path: Path) -> int | None:
    """A descriptor holding an exclusive ``flock`` on ``path`` (created if missing), or None when
    another process holds it. A sweep claims a cell's log so while it runs the cell: two sweeps into
    one folder never run a cell at once (they overwrote each other's log and checkpoint). The lock
    goes with the descriptor, or with the process if it is killed; without ``fcntl`` it always succeeds."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def append_row(path: Path, row: dict) -> bool:
    """Add ``row`` atomically: rewrite to ``<name>.tmp``, fsync, ``os.replace``, under a lock on the
    folder (other processes appending to the same CSV wait, and their rows are kept). A row whose
    run is already there (same :func:`run_key`: another sweep into the folder finished it first) is
    not added again; returns whether the row was added.

    Columns are the union of the existing ones and the row's, key first, provenance last.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):
        existing = read_rows(path)
        if run_key(row) in {run_key(r) for r in existing}:
            return False
        rows = existing + [{k: _format(v) for k, v in row.items()}]
        metric_cols: list[str] = []
        for r in rows:
            metric_cols += [c for c in r if c not in KEY_COLUMNS + PROVENANCE_COLUMNS and c not in metric_cols]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=KEY_COLUMNS + metric_cols + PROVENANCE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return True


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def processes(row: dict) -> int:
    """How many processes ran a row's run: N of a ``device`` such as ``cuda:0 x8``, else 1."""
    _, sep, count = (row.get("device") or "").rpartition(" x")
    return int(count) if sep and count.isdigit() else 1


def run_key(row: dict) -> tuple[str, str, str, str, int]:
    """(task, variant, seed as written, config_hash, process count): rows with the same key are the
    same run."""
    return row["task"], row["variant"], str(row["seed"]), row["config_hash"], processes(row)


def finished_keys(rows: list[dict]) -> set[tuple[str, str, int, str]]:
    """(task, variant, seed, config_hash) of every row: the cells resume skips."""
    return {(r["task"], r["variant"], int(r["seed"]), r["config_hash"]) for r in rows}
