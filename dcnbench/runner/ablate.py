"""``dcnbench ablate``: expand a table's cells, run the sweep, print mean ± std per cell."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dcnbench.errors import InvalidSetting

from . import distributed as dist
from .experiment import Cell, expand_cells, load_experiment
from .results import UnreadableCSV, read_rows
from .sweep import run_sweep, summarize
from .train import file_sha256


def ablation_cells(table: int, tier: str, tasks: list[str] | None = None, seeds: int | None = None,
                   data_root: str | None = None, weights: str | None = None,
                   variants: list[str] | None = None) -> list[Cell]:
    """The table's cells at ``tier``; ``data_root`` goes into the config of every cell that reads a real
    dataset (InvalidSetting when none does: it would be ignored, and when one needs it and there is
    none), ``weights`` into every cell's (InvalidSetting unless they load into the cells' backbone),
    all before any run starts."""
    cells = expand_cells(load_experiment(table), tier, tasks or None, seeds, variants or None)
    real = [c.config["data"].get("source", "synthetic") != "synthetic" for c in cells]
    if data_root and not any(real):
        raise InvalidSetting(f"tier {tier} trains on the synthetic benchmark, which --data-root does not change; "
                             "the paper tier reads the real datasets", "data_root")
    if not data_root and any(r and not c.config["data"].get("root") for c, r in zip(cells, real)):
        raise InvalidSetting(f"tier {tier} reads the real datasets (VOC, Cityscapes, COCO): give their root "
                             "(README, Real datasets)", "data_root")
    if not weights and any(c.config["model"].get("backbone", "").startswith("resnet") for c in cells):
        raise InvalidSetting(f"tier {tier} trains ResNet from ImageNet weights, as the paper (its frozen "
                             "BatchNorm keeps the statistics of the weights it loads): give them (README, Models)",
                             "weights")
    if weights:
        _check_weights(cells, weights, tier)
        digest = file_sha256(weights)
    for cell, reads_root in zip(cells, real):
        if data_root and reads_root:
            cell.config["data"]["root"] = str(Path(data_root).resolve())
        if weights:  # the digest too: a new file at the same path is another run (hashes, resume, reuse)
            cell.config["model"].update(weights=str(Path(weights).resolve()), weights_sha256=digest)
    if data_root:
        _check_datasets([c for c, r in zip(cells, real) if r])
    return cells


def _check_datasets(cells: list[Cell]) -> None:
    """InvalidSetting (naming --data-root) unless every real dataset the cells read is there."""
    from dcnbench.data.datasets import DatasetNotFoundError

    from .train import build_data

    checked = set()
    for cell in cells:
        data = cell.config["data"]
        key = (cell.config["task"] == "deeplab", json.dumps(data, sort_keys=True))
        if key in checked:
            continue
        checked.add(key)
        try:
            build_data(cell.config["task"], data)
        except DatasetNotFoundError as exc:
            raise InvalidSetting(f"{cell.name} reads {data['source']}: {exc}", "data_root") from exc


def check_results_csv(out: str, cells: list[Cell], processes: int = 1) -> None:
    """InvalidSetting (naming --out) unless the sweep of ``cells`` (one table and tier) by
    ``processes`` processes can append to ``<out>/table<N>_<tier>.csv`` and read the folder's other
    ``table*_<tier>.csv`` (whose identical runs it reuses): each must be a readable results CSV of
    its own table and tier (:func:`~dcnbench.report.tables.row_problems`), and the target may not
    hold runs of these cells' configs by another process count, which the tables refuse to mix
    (with plain BatchNorm the numbers differ). Checked before the first run, not after it."""
    from dcnbench.report.tables import row_problems

    from .results import processes as processes_of

    table, tier = cells[0].table, cells[0].tier
    target = Path(out) / f"table{table}_{tier}.csv"
    for path in [target, *_other_tables(Path(out), target, tier)]:
        try:
            rows = read_rows(path)
        except UnreadableCSV as exc:
            raise InvalidSetting(f"{exc}: move it or choose another folder", "out") from exc
        problems = row_problems(rows, int(path.name[len("table"):].split("_")[0]), tier)
        if problems:
            raise InvalidSetting(f"{path}: {problems[0]}: move that file or choose another folder", "out")
        if path == target:
            hashes = {c.config_hash for c in cells}
            counts = {processes_of(r) for r in rows if r["config_hash"] in hashes} - {processes}
            if counts:
                raise InvalidSetting(f"{path} holds runs of these cells by {sorted(counts)} process(es), this sweep "
                                     f"runs with {processes}: the tables do not mix them (README, distributed "
                                     f"training); choose another folder", "out")


def _other_tables(out_dir: Path, target: Path, tier: str) -> list[Path]:
    """The ``table<M>_<tier>.csv`` in ``out_dir`` other than ``target``: the sweep reuses their runs."""
    return sorted(p for p in out_dir.glob(f"table*_{tier}.csv")
                  if p != target and re.fullmatch(rf"table\d+_{re.escape(tier)}\.csv", p.name))


def _check_weights(cells: list[Cell], weights: str, tier: str) -> None:
    """InvalidSetting unless ``weights`` load into the backbone of the first cell's model (a tier's
    cells share the backbone's depth and widths; offset convs are new layers either way)."""
    from dcnbench.models.backbone import load_backbone_weights
    from dcnbench.models.build import build_model

    from .train import MODEL_TASK, model_settings

    cell = cells[0]
    try:
        model = build_model({**model_settings(cell.config), "task": MODEL_TASK[cell.config["task"]], "num_classes": 2})
        load_backbone_weights(model, weights)
    except (ValueError, TypeError) as exc:
        raise InvalidSetting(f"the weights do not fit tier {tier}'s backbone: {exc}", "weights") from exc


def run_ablation(cells: list[Cell], jobs: int, out: str, console: Console | None = None) -> list[tuple[str, str]]:
    """Run (or resume) the sweep of ``cells`` (one table and tier, from :func:`ablation_cells`) into
    ``<out>/table<N>_<tier>.csv``; returns the failed cells.

    Under torchrun every rank calls this with the same cells; each cell then trains data-parallel
    and rank 0 reports.
    """
    dist.init_from_env()
    console = console or Console(quiet=not dist.is_main())
    table, tier = cells[0].table, cells[0].tier
    out_dir = Path(out)
    csv_path = out_dir / f"table{table}_{tier}.csv"
    console.print(f"Table {table}, tier {tier}: {len(cells)} runs -> {csv_path}")
    others = _other_tables(out_dir, csv_path, tier)
    report = run_sweep(cells, csv_path, out_dir / "logs" / csv_path.stem, out_dir / "checkpoints" / csv_path.stem,
                       jobs, console, reuse_from=others, proposals_dir=out_dir / "proposals")
    console.print(f"{report.ran} ran, {report.skipped} already done, {len(report.failed)} failed")
    print_summary(csv_path, cells, console)
    dist.shutdown()
    return report.failed


def print_summary(csv_path: Path, cells: list[Cell], console: Console) -> None:
    stats = summarize(csv_path, cells)
    if stats.empty:
        console.print("no finished runs yet")
        return
    view = Table(title=f"{csv_path.stem}: mean ± std over seeds")
    for column in ("task", "variant", "metric", "mean ± std", "seeds"):
        view.add_column(column)
    for row in stats.itertuples():
        spread = "" if row.count < 2 else f" ± {row.std:.2f}"
        view.add_row(row.task, row.variant, row.metric, f"{row.mean:.2f}{spread}", str(row.count))
    console.print(view)
