"""``dcnbench check``: the regression gate of reproduced numbers.

Three parts:

1. **Smoke re-run against a reference.** ``results/reference/smoke/table<N>.csv`` holds, per
   (task, variant, metric) of the smoke tier, the mean and std over several seeds, the seed values
   and a tolerance ``max(k * std, k * pooled std, floor_abs + floor_rel * |mean|)`` (pooled: the
   (task, metric)'s seed std over the table's variants); ``reference.json`` records k,
   the floors, the seeds, threads and provenance. ``--update-reference`` measures it (smoke tier,
   >= 3 seeds). ``check`` re-runs the smoke tier (seed 0) and fails when a number leaves
   ``mean ± tolerance``, when a referenced cell produced no number, or when a cell's config hash
   no longer matches the reference (the reference is stale: re-measure it).
2. **Committed cpu-tier CSVs.** Each ``results/ablate/table<N>_cpu.csv`` must parse, render in
   every format, and have rows matching the current experiment configs; every finding in
   ``results/ablate/findings.toml`` on a present CSV must have a recorded verdict (holds / does
   not hold) that the CSV still gives. ``--record-findings`` evaluates and records the verdicts.
   The committed ``results/tables/table<N>_cpu.md`` must be the current rendering of the CSVs.
3. **One cpu-tier cell re-run** (``CPU_PROBE``, DeepLab res5a-c of Table 1, seed 0, with the smoke
   re-run): its metrics within its committed seeds' mean ± tolerance. The smoke networks learn
   nothing; this one does, so it is the gate's check that training still learns.

A finding compares two means over seeds: ``mean(a) - mean(b) > max(min_se * SE, min_diff)`` with
``SE = sqrt(s_a²/n_a + s_b²/n_b)``; ``a`` and ``b`` are variants (and ``metric_b`` optionally a
second metric, e.g. large- vs small-object effective dilation of the same runs).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .paper import RESULTS_DIR
from .tables import (FORMATS, Stat, diff_se, format_rendered, load_ours, render_table, results_csv, row_problems,
                     to_markdown)

REFERENCE_DIR = RESULTS_DIR / "reference" / "smoke"
FINDINGS_PATH = RESULTS_DIR / "ablate" / "findings.toml"
REFERENCE_COLUMNS = ["table", "task", "variant", "metric", "config_hash", "mean", "std", "std_pooled", "n", "tolerance",
                     "seed_values"]
DEFAULT_K = 4.0
DEFAULT_FLOOR_ABS = 0.1
DEFAULT_FLOOR_REL = 0.02
SMOKE_TABLES = (1, 2, 3)
CPU_TABLES = (1, 2, 3)


# ---------------------------------------------------------------------------------------------
# Problems, reported as a readable diff
# ---------------------------------------------------------------------------------------------


@dataclass
class Problem:
    where: str  # e.g. "table 1 smoke deeplab/res5c miou" or a file
    expected: str
    got: str
    why: str


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def extend(self, other: "CheckReport") -> None:
        self.problems += other.problems
        self.passed += other.passed
        self.notes += other.notes

    def text(self) -> str:
        lines = []
        if self.problems:
            w = max(len(p.where) for p in self.problems)
            we = max([len("expected")] + [len(p.expected) for p in self.problems])
            wg = max([len("got")] + [len(p.got) for p in self.problems])
            lines.append(f"{'cell':<{w}}  {'expected':<{we}}  {'got':<{wg}}  why")
            for p in self.problems:
                lines.append(f"{p.where:<{w}}  {p.expected:<{we}}  {p.got:<{wg}}  {p.why}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"{len(self.passed)} checks passed, {len(self.problems)} failed")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:.4g}"


# ---------------------------------------------------------------------------------------------
# Part 1: the smoke reference
# ---------------------------------------------------------------------------------------------


def _is_metric(name: str) -> bool:
    """Numbers a run reports that the gate compares (timings, ending in ``_s``, are not)."""
    from dcnbench.runner.results import KEY_COLUMNS, PROVENANCE_COLUMNS

    return name not in KEY_COLUMNS and name not in PROVENANCE_COLUMNS and not name.endswith("_s")


def per_seed_values(rows: list[dict]) -> dict[tuple[str, str, str, str], dict[int, float]]:
    """(task, variant, metric, config_hash) -> {seed: value} of a results CSV's rows."""
    out: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for r in rows:
        for metric, text in r.items():
            if not _is_metric(metric) or text in (None, ""):
                continue
            try:
                v = float(text)
            except ValueError:
                continue
            out.setdefault((r["task"], r["variant"], metric, r["config_hash"]), {})[int(r["seed"])] = v
    return out


def tolerance(std: float, pooled: float, mean: float, k: float, floor_abs: float, floor_rel: float) -> float:
    """max(k * cell std, k * pooled std, floor_abs + floor_rel * |mean|); nan stds are skipped."""
    spread = [k * v for v in (std, pooled) if not math.isnan(v)]
    return max(spread + [floor_abs + floor_rel * abs(mean)])


def reference_from_seeds(table: int, cells: dict[tuple[str, str, str, str], dict[int, float]], k: float = DEFAULT_K,
                         floor_abs: float = DEFAULT_FLOOR_ABS, floor_rel: float = DEFAULT_FLOOR_REL) -> list[dict]:
    """Reference records from per-seed values: (task, variant, metric, config_hash) -> {seed: value}.

    Besides each cell's own seed std, the *pooled* std of its (task, metric) over the table's
    variants, sqrt(mean of the cells' variances), enters the tolerance: a smoke metric's seed spread
    is much the same across variants, and three seeds alone underestimate it (the smoke metrics are
    heavy-tailed: mostly near zero, now and then a jump).
    """
    stats = {key: Stat.of([by_seed[s] for s in sorted(by_seed)]) for key, by_seed in cells.items()}
    variances: dict[tuple[str, str], list[float]] = {}
    for (task, _, metric, _), st in stats.items():
        if st.n > 1:
            variances.setdefault((task, metric), []).append(st.std**2)
    pooled = {key: math.sqrt(sum(v) / len(v)) for key, v in variances.items()}
    out = []
    for (task, variant, metric, chash), st in stats.items():
        by_seed = cells[(task, variant, metric, chash)]
        pool = pooled.get((task, metric), math.nan)
        out.append({"table": table, "task": task, "variant": variant, "metric": metric, "config_hash": chash,
                    "mean": f"{st.mean:.6g}", "std": "" if st.n < 2 else f"{st.std:.6g}",
                    "std_pooled": "" if math.isnan(pool) else f"{pool:.6g}", "n": st.n,
                    "tolerance": f"{tolerance(st.std, pool, st.mean, k, floor_abs, floor_rel):.6g}",
                    "seed_values": ";".join(f"{s}:{by_seed[s]:.6g}" for s in sorted(by_seed))})
    return out


def reference_rows(table: int, rows: list[dict], k: float = DEFAULT_K, floor_abs: float = DEFAULT_FLOOR_ABS,
                   floor_rel: float = DEFAULT_FLOOR_REL) -> list[dict]:
    """Reference records (REFERENCE_COLUMNS) from a multi-seed smoke results CSV's rows."""
    return reference_from_seeds(table, per_seed_values(rows), k, floor_abs, floor_rel)


def rederive_reference(directory: Path, table: int, k: float = DEFAULT_K, floor_abs: float = DEFAULT_FLOOR_ABS,
                       floor_rel: float = DEFAULT_FLOOR_REL) -> list[dict]:
    """Recompute a stored reference's statistics and tolerances from its own seed values."""
    cells = {}
    for r in read_reference(directory, table):
        by_seed = {}
        for item in r["seed_values"].split(";"):
            seed, value = item.split(":")
            by_seed[int(seed)] = float(value)
        cells[(r["task"], r["variant"], r["metric"], r["config_hash"])] = by_seed
    return reference_from_seeds(table, cells, k, floor_abs, floor_rel)


def write_reference(directory: Path, table: int, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"table{table}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REFERENCE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return path


def read_reference(directory: Path, table: int) -> list[dict]:
    path = directory / f"table{table}.csv"
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def compare_to_reference(table: int, reference: list[dict], rows: list[dict], seed: int = 0,
                         tier: str = "smoke") -> CheckReport:
    """Each reference cell against the ``seed`` run in ``rows`` (a fresh results CSV of ``tier``)."""
    report = CheckReport()
    if not reference:
        report.problems.append(Problem(f"table {table} {tier}", "reference cells", "none",
                                       "the reference CSV is empty: re-measure with `dcnbench check --update-reference`"))
        return report
    got = per_seed_values(rows)
    by_cell = {(t, v, m): (h, s) for (t, v, m, h), s in got.items()}
    seen = set()
    with_zero = sum(1 for ref in reference if abs(float(ref["mean"])) <= float(ref["tolerance"]))
    if with_zero:
        report.notes.append(f"table {table}: {with_zero} of {len(reference)} {tier} bands include 0 (the smoke runs "
                            "barely train: a model that learned nothing passes them)")
    for ref in reference:
        task, variant, metric = ref["task"], ref["variant"], ref["metric"]
        where = f"table {table} {tier} {task}/{variant} {metric}"
        mean, tol = float(ref["mean"]), float(ref["tolerance"])
        expected = f"{_fmt(mean)} ± {_fmt(tol)}"
        seen.add((task, variant, metric))
        if (task, variant, metric) not in by_cell:
            report.problems.append(Problem(where, expected, "missing", "no number from the smoke run (failed run?)"))
            continue
        chash, by_seed = by_cell[(task, variant, metric)]
        if chash != ref["config_hash"]:
            report.problems.append(Problem(where, f"config {ref['config_hash']}", f"config {chash}",
                                           "config changed: re-measure with `dcnbench check --update-reference`"))
            continue
        if seed not in by_seed:
            report.problems.append(Problem(where, expected, "missing", f"no seed-{seed} run"))
            continue
        value = by_seed[seed]
        if math.isfinite(value) and abs(value - mean) <= tol:
            report.passed.append(where)
        else:
            report.problems.append(Problem(where, expected, _fmt(value), f"off by {_fmt(value - mean)} (> tolerance)"))
    extra = sorted(k for k in by_cell if k not in seen)
    if extra:
        report.notes.append(f"table {table}: {len(extra)} {tier} numbers not in the reference (new metrics or "
                            f"cells?), e.g. {'/'.join(extra[0])}; re-measure to gate them")
    return report


def _run_smoke(table: int, seeds: int, jobs: int, out: Path) -> tuple[list[dict], list]:
    """Run (or resume) the smoke tier of a table into ``out``; progress goes to stderr."""
    from rich.console import Console

    from dcnbench.runner.ablate import ablation_cells, run_ablation
    from dcnbench.runner.results import read_rows

    failed = run_ablation(ablation_cells(table, "smoke", seeds=seeds), jobs, str(out), console=Console(stderr=True))
    return read_rows(out / f"table{table}_smoke.csv"), failed


def update_reference(tables=SMOKE_TABLES, seeds: int = 3, jobs: int = 1, k: float = DEFAULT_K,
                     floor_abs: float = DEFAULT_FLOOR_ABS, floor_rel: float = DEFAULT_FLOOR_REL,
                     directory: Path | None = None, work_dir: Path | None = None) -> list[Path]:
    """Run the smoke tier with ``seeds`` seeds and write the reference CSVs and reference.json."""
    from dcnbench.runner.results import cpu_budget, provenance

    if seeds < 3:
        raise ValueError("the reference needs >= 3 seeds to measure a spread")
    directory = directory or REFERENCE_DIR
    written = []
    with tempfile.TemporaryDirectory(prefix="dcnbench-ref-") as tmp:
        out = Path(work_dir) if work_dir else Path(tmp)
        for table in tables:
            rows, failed = _run_smoke(table, seeds, jobs, out)
            if failed:
                raise RuntimeError(f"table {table}: {len(failed)} smoke runs failed, e.g. {failed[0]}")
            written.append(write_reference(directory, table, reference_rows(table, rows, k, floor_abs, floor_rel)))
    threads = max(1, cpu_budget() // jobs)
    measured = {"seeds": seeds, "jobs": jobs, "threads": threads, **provenance(),
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    meta_path = directory / "reference.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rule = {"k": k, "floor_abs": floor_abs, "floor_rel": floor_rel}
    keep = {}  # tables measured before with the same tolerance rule stay in the reference
    if all(old.get(key) == value for key, value in rule.items()):
        keep = {t: m for t, m in old.get("measured", {}).items()
                if int(t) not in tables and (directory / f"table{t}.csv").is_file()}
    by_table = {**keep, **{str(t): measured for t in tables}}
    meta = {"tier": "smoke", "tables": sorted(int(t) for t in by_table), "compare_seed": 0, "jobs": jobs,
            **rule, "tolerance": "max(k * std over seeds, k * pooled std of the (task, metric) over the table's variants, "
                         "floor_abs + floor_rel * |mean|)",
            "measured": dict(sorted(by_table.items()))}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    written.append(directory / "reference.json")
    return written


def check_smoke(tables=None, jobs: int | None = None, directory: Path | None = None,
                work_dir: Path | None = None) -> CheckReport:
    """Re-run the smoke tier (seed 0) of every referenced table and compare. ``jobs`` defaults to
    the reference's, so that the runs use the same thread count as the reference's."""
    directory = directory or REFERENCE_DIR
    report = CheckReport()
    meta_path = directory / "reference.json"
    if not meta_path.is_file():
        report.problems.append(Problem(str(meta_path), "a smoke reference", "missing",
                                       "measure one with `dcnbench check --update-reference`"))
        return report
    meta = json.loads(meta_path.read_text())
    tables = tables or meta.get("tables", SMOKE_TABLES)
    if not tables:
        report.problems.append(Problem(str(meta_path), "referenced tables", "none",
                                       "re-measure with `dcnbench check --update-reference`"))
        return report
    with tempfile.TemporaryDirectory(prefix="dcnbench-check-") as tmp:
        out = Path(work_dir) if work_dir else Path(tmp)
        for table in tables:
            if not (directory / f"table{table}.csv").is_file():
                report.problems.append(Problem(f"table {table} smoke", "a reference CSV", "missing",
                                               "measure with `dcnbench check --update-reference`"))
                continue
            measured = meta.get("measured", {}).get(str(table), {})
            rows, failed = _run_smoke(table, 1, jobs or int(measured.get("jobs", meta.get("jobs", 1))), out)
            for name, log in failed:
                report.notes.append(f"table {table}: smoke run {name} failed, log {log}")
            report.extend(compare_to_reference(table, read_reference(directory, table), rows,
                                               int(meta.get("compare_seed", 0))))
    return report


# ---------------------------------------------------------------------------------------------
# Part 2: committed cpu-tier CSVs and their findings
# ---------------------------------------------------------------------------------------------


@dataclass
class Finding:
    id: str
    text: str
    table: int
    tier: str
    task: str
    metric: str
    a: str
    b: str
    metric_b: str = ""
    min_se: float = 2.0
    min_diff: float = 0.0
    holds: bool | None = None  # the verdict recorded with the committed CSV
    measured: str = ""

    def evaluate(self, stats: dict[tuple[str, str, str], Stat]) -> tuple[bool | None, str]:
        """(verdict, measurement); verdict None when the numbers are missing or SE is undefined."""
        sa = stats.get((self.task, self.a, self.metric))
        sb = stats.get((self.task, self.b, self.metric_b or self.metric))
        if sa is None or sb is None:
            return None, "missing numbers: " + ", ".join(
                f"{self.task}/{v} {m}" for v, m, s in ((self.a, self.metric, sa), (self.b, self.metric_b or self.metric, sb))
                if s is None)
        diff, se = sa.mean - sb.mean, diff_se(sa, sb)
        if math.isnan(se) and self.min_se > 0:
            return None, f"diff {diff:+.3g} but SE undefined (one seed)"
        need = max(self.min_se * se if self.min_se > 0 else 0.0, self.min_diff)
        ratio = "" if math.isnan(se) or se == 0 else f" = {diff / se:.2f} SE"
        return diff > need, f"diff {diff:+.3g}, SE {se:.3g}{ratio}, needs > {need:.3g}"


FINDING_FIELDS = ["id", "text", "table", "tier", "task", "metric", "metric_b", "a", "b", "min_se", "min_diff",
                  "holds", "measured"]


def load_findings(path: Path | None = None) -> list[Finding]:
    path = path or FINDINGS_PATH
    if not path.is_file():
        return []
    with path.open("rb") as f:
        data = tomllib.load(f)
    out = []
    for i, raw in enumerate(data.get("finding", [])):
        unknown = set(raw) - set(FINDING_FIELDS)
        if unknown:
            raise ValueError(f"{path}: finding {i + 1} has unknown keys {sorted(unknown)}")
        try:
            out.append(Finding(**raw))
        except TypeError as exc:
            raise ValueError(f"{path}: finding {i + 1}: {exc}") from None
    ids = [f.id for f in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: finding ids must be unique")
    return out


FINDINGS_HEADER = """\
# Findings about the committed cpu-tier results (results/ablate/table<N>_cpu.csv).
# Each claims mean(a) - mean(b) > max(min_se * SE, min_diff) over seeds, SE = sqrt(sa²/na + sb²/nb)
# (metric_b: compare a second metric of b). `holds` is the verdict recorded when the CSV was
# committed (`dcnbench check --record-findings`), true or false, honestly; `dcnbench check` fails
# when the committed CSV no longer gives the recorded verdict. `measured` is informational.
"""


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_findings(findings: list[Finding], path: Path | None = None) -> Path:
    path = path or FINDINGS_PATH
    defaults = Finding("", "", 0, "", "", "", "", "")
    lines = [FINDINGS_HEADER]
    for f in findings:
        lines.append("[[finding]]")
        for name in FINDING_FIELDS:
            value = getattr(f, name)
            if value is None or (name in ("metric_b", "measured") and value == "") or (
                    name == "min_diff" and value == defaults.min_diff):
                continue
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _stats_for(table: int, tier: str, root: Path | None) -> dict:
    return load_ours(table, tier, results_csv(table, tier, root)).stats


def record_findings(path: Path | None = None, root: Path | None = None) -> list[Finding]:
    """Evaluate every finding whose CSV is present and record its verdict (None when undecidable)."""
    findings = load_findings(path)
    cache: dict[tuple[int, str], dict] = {}
    for f in findings:
        if not results_csv(f.table, f.tier, root).is_file():
            continue
        stats = cache.setdefault((f.table, f.tier), _stats_for(f.table, f.tier, root))
        f.holds, f.measured = f.evaluate(stats)
    write_findings(findings, path)
    return findings


def check_findings(path: Path | None = None, root: Path | None = None) -> CheckReport:
    report = CheckReport()
    path = path or FINDINGS_PATH
    present = [results_csv(t, "cpu", root).name for t in CPU_TABLES if results_csv(t, "cpu", root).is_file()]
    if not path.is_file() and present:
        report.problems.append(Problem(str(path), "the findings on " + ", ".join(present), "missing",
                                       "restore it: the CSVs' claims go unchecked without it"))
    findings = load_findings(path)
    cache: dict[tuple[int, str], dict] = {}
    for f in findings:
        where = f"finding {f.id}"
        recorded = {True: "holds", False: "does not hold", None: "unrecorded"}[f.holds]
        if not results_csv(f.table, f.tier, root).is_file():
            if f.holds is not None:
                report.problems.append(Problem(where, recorded, "no CSV", f"{results_csv(f.table, f.tier, root).name} is gone"))
            else:
                report.notes.append(f"{where}: skipped, no {results_csv(f.table, f.tier, root).name} yet")
            continue
        try:
            stats = cache.setdefault((f.table, f.tier), _stats_for(f.table, f.tier, root))
        except ValueError as exc:  # a malformed CSV (check_cpu_csvs says why, line by line)
            report.problems.append(Problem(where, recorded, "unusable CSV", str(exc)))
            continue
        verdict, measured = f.evaluate(stats)
        now = {True: "holds", False: "does not hold", None: "undecidable"}[verdict]
        if f.holds is None and verdict is None:  # e.g. a partial sweep: those cells have not run yet
            report.notes.append(f"{where}: undecidable ({measured})")
        elif f.holds is None:
            report.problems.append(Problem(where, "a recorded verdict", now + f" ({measured})",
                                           "record it: `dcnbench check --record-findings`"))
        elif verdict is None or verdict != f.holds:
            report.problems.append(Problem(where, recorded, now, measured + f" [{f.text}]"))
        else:
            report.passed.append(where)
    return report


def check_cpu_csvs(tables=CPU_TABLES, root: Path | None = None, tier: str = "cpu") -> CheckReport:
    """Each present ``table<N>_<tier>.csv``: parses, has rows of the current configs (of every cell
    it has rows of), renders."""
    from dcnbench.runner.experiment import expand_cells, load_experiment
    from dcnbench.runner.results import UnreadableCSV, read_rows

    report = CheckReport()
    for table in tables:
        path = results_csv(table, tier, root)
        if not path.is_file():
            report.notes.append(f"table {table}: no {path.name} committed yet")
            continue
        where = str(path.name)
        try:
            rows = read_rows(path)
        except UnreadableCSV as exc:
            report.problems.append(Problem(where, "a CSV", "unreadable", str(exc)))
            continue
        if not rows:
            report.problems.append(Problem(where, "rows of finished runs", "no rows", "malformed"))
            continue
        bad = row_problems(rows, table, tier)
        if bad:
            report.problems.append(Problem(where, "well-formed rows", f"{len(bad)} bad", "; ".join(bad[:3])))
            continue
        report.passed.append(f"{where} parses")
        current = {(c.task, c.variant): c.config_hash for c in expand_cells(load_experiment(table), tier)}
        is_current = [current.get((r["task"], r["variant"])) == r["config_hash"] for r in rows]
        stale = is_current.count(False)
        if stale == len(rows):
            report.problems.append(Problem(where, "rows of the current configs", f"all {stale} stale",
                                           "the experiment definition changed since these runs"))
            continue
        lost = sorted({(r["task"], r["variant"]) for r in rows if (r["task"], r["variant"]) in current}
                      - {(r["task"], r["variant"]) for r, ok in zip(rows, is_current) if ok})
        if lost:  # a config changed under committed runs: their numbers are gone from the table
            report.problems.append(Problem(where, "rows of the current configs", f"{len(lost)} cell(s) all stale",
                                           ", ".join("/".join(c) for c in lost[:4]) + (" ..." if len(lost) > 4 else "")
                                           + ": their config changed since these runs; rerun them"))
            continue
        if stale:
            report.notes.append(f"{where}: {stale} of {len(rows)} rows are of older configs (ignored)")
        try:
            for fmt in FORMATS:
                format_rendered(render_table(table, tier, path), fmt)
        except Exception as exc:  # any failure to render is a failure of the gate
            report.problems.append(Problem(where, "renders", "error", f"{type(exc).__name__}: {exc}"))
            continue
        report.passed.append(f"{where} renders")
    return report


def check_table4(results_dir: Path | None = None) -> CheckReport:
    """The committed Table 4 CSVs (params, runtime per device) render beside the paper's."""
    from .tables import build_table4

    report = CheckReport()
    results_dir = results_dir or RESULTS_DIR
    present = sorted(p.name for p in results_dir.glob("table4_*.csv"))
    if not present:
        report.notes.append("table 4: no params / runtime CSVs committed yet")
        return report
    try:
        rendered = build_table4(results_dir)
        for fmt in FORMATS:
            format_rendered(rendered, fmt)
    except Exception as exc:  # any failure to render is a failure of the gate
        report.problems.append(Problem(", ".join(present), "renders", "error", f"{type(exc).__name__}: {exc}"))
        return report
    measured = sum(1 for rec in rendered.records if rec["ours"] != "")
    if not measured:
        report.problems.append(Problem(", ".join(present), "numbers for paper rows", "none",
                                       "no (model, variant) of the CSVs matches a row of Table 4"))
    else:
        report.passed.append(f"table 4 renders ({measured} of {len(rendered.records)} cells measured)")
    return report


CPU_PROBE = (1, "deeplab", "res5a-c")  # (table, task, variant) of the cpu-tier cell the gate re-runs


def _run_probe(table: int, task: str, variant: str, jobs: int, out: Path) -> list[dict]:
    """Run the cpu-tier cell (seed 0) into ``out``; its rows. Progress goes to stderr."""
    from rich.console import Console

    from dcnbench.runner.ablate import ablation_cells, run_ablation
    from dcnbench.runner.results import read_rows

    run_ablation(ablation_cells(table, "cpu", [task], 1, variants=[variant]), jobs, str(out),
                 console=Console(stderr=True))
    return read_rows(out / f"table{table}_cpu.csv")


def check_cpu_probe(probe: tuple[int, str, str] = CPU_PROBE, root: Path | None = None) -> CheckReport:
    """Re-run one committed cpu-tier cell at seed 0, at the thread count of its committed runs, and
    compare each metric with those runs' mean ± tolerance (as the smoke reference's). The smoke runs
    learn nothing; this cell does (DeepLab res5a-c: mIoU ~27 where predicting background everywhere
    scores 12.8), so a change that stops training from learning fails here. ~100 s on 2 cores."""
    from dcnbench.runner.experiment import expand_cells, load_experiment
    from dcnbench.runner.results import cpu_budget, read_rows

    table, task, variant = probe
    report = CheckReport()
    path = results_csv(table, "cpu", root)
    if not path.is_file():
        report.notes.append(f"cpu probe: no {path.name} committed yet")
        return report
    current = {c.config_hash for c in expand_cells(load_experiment(table), "cpu")
               if (c.task, c.variant) == (task, variant)}
    rows = [r for r in read_rows(path) if (r["task"], r["variant"]) == (task, variant) and r["config_hash"] in current]
    if len(rows) < 2:
        report.problems.append(Problem(f"table {table} cpu {task}/{variant}", "2+ committed runs of the current config",
                                       str(len(rows)), "rerun the cell's seeds with `dcnbench ablate`"))
        return report
    jobs = max(1, cpu_budget() // max(int(r["threads"]) for r in rows))
    with tempfile.TemporaryDirectory(prefix="dcnbench-probe-") as tmp:
        fresh = _run_probe(table, task, variant, jobs, Path(tmp))
    report.extend(compare_to_reference(table, reference_rows(table, rows), fresh, tier="cpu"))
    return report


def check_markdown(root: Path | None = None) -> CheckReport:
    """Each committed ``tables/table<N>_cpu.md`` is what ``dcnbench table N`` renders from the
    committed CSVs now (a CSV rerun without re-rendering leaves it stale). ``root`` holds
    ``ablate/`` (Tables 1-3), ``tables/`` and Table 4's CSVs [default: the checkout's results/]."""
    root = root or RESULTS_DIR
    report = CheckReport()
    for table in (*CPU_TABLES, 4):
        path = root / "tables" / f"table{table}_cpu.md"
        if not path.is_file():
            continue
        try:
            csv_path = None if table == 4 else results_csv(table, "cpu", root / "ablate")
            rendered = to_markdown(render_table(table, "cpu", csv_path, results_dir=root))
        except Exception:  # noqa: BLE001 -- a CSV that does not render is the CSV checks' problem
            continue
        if path.read_text() != rendered:
            report.problems.append(Problem(f"tables/{path.name}", "the rendering of the committed CSVs", "stale",
                                           f"re-render it: dcnbench table {table}"))
        else:
            report.passed.append(f"tables/{path.name} is current")
    return report


def run_check(smoke: bool = True, tables=None, jobs: int | None = None, findings_path: Path | None = None,
              reference_dir: Path | None = None, results_root: Path | None = None) -> CheckReport:
    report = CheckReport()
    report.extend(check_cpu_csvs(root=results_root))
    report.extend(check_table4(results_root.parent if results_root else None))
    report.extend(check_markdown(results_root.parent if results_root else None))
    report.extend(check_findings(findings_path, results_root))
    if smoke:
        report.extend(check_smoke(tables, jobs, reference_dir))
        if not tables or CPU_PROBE[0] in tables:
            report.extend(check_cpu_probe(root=results_root))
    if not report.passed:
        report.problems.append(Problem("the gate", "at least one check", "none ran",
                                       "no reference, CSVs or findings to check: nothing would be caught"))
    return report
