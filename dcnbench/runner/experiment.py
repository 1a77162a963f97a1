"""Experiment definitions (``experiments/*.toml``) and their expansion into cells.

Definitions are data: ``tiers.toml`` holds the tiers (smoke / cpu / paper) every table shares —
data, model, train and eval settings with per-task overrides — and ``table<N>.toml`` holds a
table's tasks and variants (overrides, optionally limited to some tasks) and may override tier
settings under its own ``[tiers.<tier>]``. A *cell* is one (task, variant, seed) run with its fully
merged config.

Merge order for a cell: ``tier.<section>`` < ``tier.task.<task>.<section>`` < ``variant.<section>``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from dcnbench.errors import InvalidSetting

TASKS = ("deeplab", "rpn", "faster", "rfcn")
TIERS = ("smoke", "cpu", "paper")
SECTIONS = ("data", "model", "train", "eval")
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


@dataclass(frozen=True)
class Cell:
    """One run: ``config`` has keys table, tier, task, variant, seed and the merged sections."""

    table: int
    tier: str
    task: str
    variant: str
    seed: int
    config: dict = field(hash=False, compare=False)

    @property
    def config_hash(self) -> str:
        """12 hex digits over everything that defines the run except the seed."""
        return _digest({k: v for k, v in self.config.items() if k != "seed"})

    @property
    def run_hash(self) -> str:
        """12 hex digits over what the run computes: task and the four sections. Two cells of
        different tables (Table 3's atrous-2 and Table 1's none) with the same run hash and seed
        are the same run; the sweep reuses one's row for the other."""
        return _digest({k: self.config[k] for k in ("task", *SECTIONS)})

    @property
    def key(self) -> tuple[str, str, int, str]:
        return self.task, self.variant, self.seed, self.config_hash

    @property
    def name(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.variant)
        return f"{self.task}__{safe}__seed{self.seed}"


def _digest(payload: dict) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_toml(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def load_experiment(table: int, directory: Path | None = None) -> dict:
    """Parse ``table<N>.toml`` over the shared ``tiers.toml`` (tomllib: data only, no code)."""
    directory = directory or EXPERIMENTS_DIR
    path = directory / f"table{table}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no experiment definition for table {table}: expected {path}")
    spec = _read_toml(path)
    spec["tiers"] = _merge(_read_toml(directory / "tiers.toml").get("tiers", {}), spec.get("tiers", {}))
    if spec.get("table") != table:
        raise ValueError(f"{path} declares table = {spec.get('table')!r}, expected {table}")
    unknown = set(spec.get("tasks", [])) - set(TASKS)
    if unknown:
        raise ValueError(f"{path}: unknown tasks {sorted(unknown)}; known: {TASKS}")
    return spec


def expand_cells(spec: dict, tier: str, tasks: list[str] | None = None, seeds: int | None = None,
                 variants: list[str] | None = None) -> list[Cell]:
    """All (task, variant, seed) cells of a table at ``tier``, in definition order.

    ``tasks`` / ``variants`` restrict to some tasks / variants (names as in the table file);
    ``seeds`` overrides the tier's seed count (seeds 0..N-1). Raises :class:`InvalidSetting` for a
    task or variant the table lacks, or a choice of both that selects no cell.
    """
    if tier not in spec.get("tiers", {}):
        raise ValueError(f"table {spec['table']} has no tier {tier!r}; it has {sorted(spec.get('tiers', {}))}")
    _check_selection(spec, tasks, variants)
    tier_spec = spec["tiers"][tier]
    table_tasks = spec["tasks"]
    chosen = [t for t in table_tasks if not tasks or t in tasks]
    n_seeds = seeds if seeds is not None else int(tier_spec.get("seeds", 1))
    cells = []
    for task in chosen:
        task_over = tier_spec.get("task", {}).get(task, {})
        for variant in spec["variants"]:
            if task not in variant.get("tasks", table_tasks) or (variants and variant["name"] not in variants):
                continue
            config = {"table": spec["table"], "tier": tier, "task": task, "variant": variant["name"]}
            for section in SECTIONS:
                merged = _merge(tier_spec.get(section, {}), task_over.get(section, {}))
                config[section] = _merge(merged, variant.get(section, {}))
            for seed in range(n_seeds):
                cells.append(Cell(spec["table"], tier, task, variant["name"], seed, {**config, "seed": seed}))
    return cells


def _check_selection(spec: dict, tasks: list[str] | None, variants: list[str] | None) -> None:
    """InvalidSetting unless every name is the table's and the tasks and variants share a cell."""
    table, table_tasks = spec["table"], spec["tasks"]
    defined = {v["name"]: v.get("tasks", table_tasks) for v in spec["variants"]}
    for field_name, given, known in (("task", tasks, table_tasks), ("variant", variants, list(defined))):
        bad = [name for name in given or [] if name not in known]
        if bad:
            raise InvalidSetting(f"table {table} has no {field_name}(s) {bad}; it has {known}", field_name)
    if tasks and variants and not any(t in defined[v] for v in variants for t in tasks):
        raise InvalidSetting("; ".join(f"variant {v!r} is not defined for task(s) {', '.join(tasks)} "
                                       f"(table {table} defines it for {', '.join(defined[v])})" for v in variants),
                             "task", "variant")
