"""Experiment definitions (``experiments/*.toml``) and their expansion into cells.

Definitions are data: ``tiers.toml`` holds the tiers (smoke / cpu / paper) every table shares —
data, model, train and eval settings with per-task overrides — and ``table<N>.toml`` holds a
table's tasks and variants (overrides, optionally limited to some tasks) and may override tier
settings under its own ``[tiers.<tier>]``. A *cell* is one (task, variant, seed) run with its fully
merged config.

Merge order for a cell: ``tier.<section>`` < ``tier.task.<task>.<section>`` < ``variant.<section>``.

A definition is checked when it is loaded: an unknown key (a typo such as ``modle`` or
``learning_rate``, which would otherwise be ignored and leave a variant equal to its baseline), two
variants of one name, a variant's task the table lacks, or a cell missing a setting the training
path needs is an :class:`InvalidSetting` naming the file, the place and the key; so is a cell's
model, train or eval value the run would reject (e.g. ``dilation_buckets = "tercile"``, which would
otherwise fail only after the cell had trained).
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from dcnbench.errors import InvalidSetting
from dcnbench.models.build import KNOWN_KEYS as MODEL_KEYS
from dcnbench.runner.train import check_settings, config_digest, definition

TASKS = ("deeplab", "rpn", "faster", "rfcn")
TIERS = ("smoke", "cpu", "paper")
SECTIONS = ("data", "model", "train", "eval")
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
# The keys each section may hold (what dcnbench/runner/train.py reads; the model's go to build_model).
SECTION_KEYS = {
    "data": {"source", "size", "num_train", "num_val", "classes", "min_object", "max_object", "seed", "root",
             "shorter_side", "max_side"},
    "model": (MODEL_KEYS - {"task", "num_classes"}) | {"weights"},
    "train": {"iters", "batch_size", "lr", "momentum", "weight_decay", "warmup_iters", "fixed_proposals"},
    "eval": {"batch_size", "area_ranges", "effective_dilation", "dilation_buckets", "voc07_metric"},
}
REQUIRED = {"train": ("iters", "batch_size", "lr"),  # synthetic data also needs the SynthConfig keys
            "synthetic": ("size", "num_train", "num_val", "classes", "min_object", "max_object")}
TABLE_KEYS = {"table", "title", "tasks", "baseline", "variants", "tiers"}
VARIANT_KEYS = {"name", "paper_row", "tasks", *SECTIONS}
TIER_KEYS = {"seeds", "task", *SECTIONS}


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
    def _hashed(self) -> dict:
        """The config as the hashes read it: a weights file by its SHA-256 alone (its path may move)."""
        return {**self.config, "model": {k: v for k, v in self.config["model"].items() if k != "weights"}}

    @property
    def config_hash(self) -> str:
        """12 hex digits over everything that defines the run except the seed."""
        return config_digest({k: v for k, v in self._hashed.items() if k != "seed"})

    @property
    def definition_hash(self) -> str:
        """12 hex digits over the cell as the experiment files define it (:func:`definition`: no
        dataset root, weights file or digest). The tables pick the rows of the current definitions by it."""
        return config_digest(definition(self.config))

    @property
    def run_hash(self) -> str:
        """12 hex digits over what the run computes: task and the four sections. Two cells of
        different tables (Table 3's atrous-2 and Table 1's none) with the same run hash and seed
        are the same run; the sweep reuses one's row for the other."""
        return config_digest({k: self._hashed[k] for k in ("task", *SECTIONS)})

    @property
    def key(self) -> tuple[str, str, int, str]:
        return self.task, self.variant, self.seed, self.config_hash

    @property
    def name(self) -> str:
        return f"{self.task}__{_file_safe(self.variant)}__seed{self.seed}"


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


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
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidSetting(f"{path} is not valid TOML: {exc}", "table") from exc


def load_experiment(table: int, directory: Path | None = None) -> dict:
    """Parse ``table<N>.toml`` over the shared ``tiers.toml`` (tomllib: data only, no code)."""
    directory = directory or EXPERIMENTS_DIR
    path = directory / f"table{table}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no experiment definition for table {table}: expected {path}")
    spec = _read_toml(path)
    tiers_path = directory / "tiers.toml"
    shared = _read_toml(tiers_path)
    _check_keys(tiers_path, "top level", shared, {"tiers"})
    for where, tiers in ((tiers_path, shared.get("tiers", {})), (path, spec.get("tiers", {}))):
        _check_tiers(where, tiers)
    spec["tiers"] = _merge(shared.get("tiers", {}), spec.get("tiers", {}))
    if spec.get("table") != table:
        raise ValueError(f"{path} declares table = {spec.get('table')!r}, expected {table}")
    unknown = set(spec.get("tasks", [])) - set(TASKS)
    if unknown:
        raise ValueError(f"{path}: unknown tasks {sorted(unknown)}; known: {TASKS}")
    _check_variants(path, spec)
    return spec


def _bad_definition(path: Path, message: str) -> InvalidSetting:
    return InvalidSetting(f"{path}: {message}", "table")


def _check_keys(path: Path, where: str, given: dict, known: set[str]) -> None:
    """InvalidSetting naming ``where`` in ``path`` when ``given`` is no table or has keys outside ``known``."""
    if not isinstance(given, dict):
        raise _bad_definition(path, f"{where} must be a table of settings, got {given!r}")
    unknown = sorted(set(given) - known)
    if unknown:
        raise _bad_definition(path, f"{where} has unknown key(s) {unknown}; known: {sorted(known)}")


def _check_sections(path: Path, where: str, entry: dict) -> None:
    for section in SECTIONS:
        if section in entry:
            _check_keys(path, f"{where}.{section}", entry[section], SECTION_KEYS[section])


def _check_tiers(path: Path, tiers: dict) -> None:
    """The tiers of ``tiers.toml`` or of a table's own ``[tiers.<tier>]``: known keys only."""
    _check_keys(path, "tiers", tiers, set(TIERS))
    for tier, tier_spec in tiers.items():
        _check_keys(path, f"tiers.{tier}", tier_spec, TIER_KEYS)
        _check_sections(path, f"tiers.{tier}", tier_spec)
        _check_keys(path, f"tiers.{tier}.task", tier_spec.get("task", {}), set(TASKS))
        for task, override in tier_spec.get("task", {}).items():
            _check_keys(path, f"tiers.{tier}.task.{task}", override, set(SECTIONS))
            _check_sections(path, f"tiers.{tier}.task.{task}", override)


def _check_variants(path: Path, spec: dict) -> None:
    """Known keys, one name per variant (also as file names), tasks and baseline of the table."""
    _check_keys(path, "top level", spec, TABLE_KEYS)
    if not spec.get("tasks") or not spec.get("variants"):
        raise _bad_definition(path, "needs tasks = [...] and at least one [[variants]]")
    seen: dict[str, str] = {}
    for i, variant in enumerate(spec["variants"]):
        where = f"variant {variant.get('name', f'#{i + 1}')!r}" if isinstance(variant, dict) else f"variant #{i + 1}"
        _check_keys(path, where, variant, VARIANT_KEYS)
        if not isinstance(variant.get("name"), str) or not variant["name"]:
            raise _bad_definition(path, f"{where} needs a name")
        safe = _file_safe(variant["name"])
        if safe in seen:
            raise _bad_definition(path, f"variants {seen[safe]!r} and {variant['name']!r} share the name (of "
                                        f"their logs and checkpoints, {safe!r}); give each its own")
        seen[safe] = variant["name"]
        bad_tasks = sorted(set(variant.get("tasks", [])) - set(spec["tasks"]))
        if bad_tasks:
            raise _bad_definition(path, f"{where} names task(s) {bad_tasks} the table lacks; it has {spec['tasks']}")
        _check_sections(path, where, variant)
    if spec.get("baseline") and spec["baseline"] not in seen.values():
        raise _bad_definition(path, f"baseline {spec['baseline']!r} is none of the variants {list(seen.values())}")


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
            _check_cell(spec, config)
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


def _check_cell(spec: dict, config: dict) -> None:
    """InvalidSetting when a merged cell config lacks a setting the training path needs or has a
    value it would reject (:func:`~dcnbench.runner.train.check_settings`)."""
    needed = [f"train.{k}" for k in REQUIRED["train"] if k not in config["train"]]
    if config["data"].get("source", "synthetic") == "synthetic":
        needed += [f"data.{k}" for k in REQUIRED["synthetic"] if k not in config["data"]]
    where = f"table {spec['table']}, tier {config['tier']}: the {config['task']} cell of variant {config['variant']!r}"
    if needed:
        raise InvalidSetting(f"{where} lacks {', '.join(needed)} (set them in experiments/tiers.toml or the table's "
                             f"file)", "table")
    try:
        check_settings(config)
    except ValueError as exc:
        raise InvalidSetting(f"{where}: {exc}", "table") from exc
