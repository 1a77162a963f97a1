"""``dcnbench table N``: the paper's table, its numbers beside ours, in the paper's layout.

Every paper column becomes two: *paper* and *ours*. Ours is the mean ± std over seeds of the runs
in ``results/ablate/table<N>_<tier>.csv`` whose config hash matches the current experiment
definition (stale rows are ignored and counted in a footnote). Each variant also shows its
difference to the baseline row, in both columns: on a small synthetic benchmark the absolute
numbers do not transfer, the differences are what can be compared. Ours' difference carries the
standard error of a difference of two means, sqrt(s_a²/n_a + s_b²/n_b).

A cell we define but have no result for is shown as ``missing``; one the experiment does not
define (or the paper marks N.A.) as ``N.A.``. Nothing is ever filled in.

Table 4 is built from the benchmark CSVs instead (``results/table4_params.csv`` and
``results/table4_runtime_<device>.csv``): parameters and times beside the paper's, with each
deformable model's overhead ratio over its plain counterpart.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .paper import RESULTS_DIR, TITLES, PaperTable, load_paper_table

FORMATS = ("console", "markdown", "latex", "csv")
MISSING = "missing"
NA = "N.A."

TASK_LABELS = {"deeplab": "DeepLab", "rpn": "class-aware RPN", "faster": "Faster R-CNN", "rfcn": "R-FCN"}
# Tables 1 and 3: (task, metric) -> paper column. Our DeepLab runs on one (synthetic) dataset:
# it sits beside mIoU@V and mIoU@C stays paper-only.
ABLATION_COLUMNS = {
    ("deeplab", "miou"): "DeepLab mIoU@V",
    ("rpn", "map50"): "class-aware RPN mAP@0.5",
    ("rpn", "map70"): "class-aware RPN mAP@0.7",
    ("faster", "map50"): "Faster R-CNN mAP@0.5",
    ("faster", "map70"): "Faster R-CNN mAP@0.7",
    ("rfcn", "map50"): "R-FCN mAP@0.5",
    ("rfcn", "map70"): "R-FCN mAP@0.7",
}
# Table 5 (COCO-style metrics): metric -> paper column.
COCO_COLUMNS = {
    "map_coco": "mAP@[0.5:0.95]",
    "map50": "mAP@0.5",
    "ap_small": "mAP@[0.5:0.95] (small)",
    "ap_medium": "mAP@[0.5:0.95] (mid)",
    "ap_large": "mAP@[0.5:0.95] (large)",
}
EFFDIL_LAYERS = ("res5a", "res5b", "res5c")
EFFDIL_CATEGORIES = ("small", "medium", "large", "background")
_EFFDIL = re.compile(r"^effdil_(res5[abc])_(small|medium|large|background)_(mean|std)$")


# ---------------------------------------------------------------------------------------------
# Our numbers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (nan for one seed) and count over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        return cls(mean, std, n)

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan


def diff_se(a: Stat, b: Stat) -> float:
    """Standard error of mean(a) - mean(b) for independent seeds; nan with a single seed."""
    return math.sqrt(a.se**2 + b.se**2)


def results_csv(table: int, tier: str, root: Path | None = None) -> Path:
    return (root or RESULTS_DIR / "ablate") / f"table{table}_{tier}.csv"


@dataclass
class Ours:
    stats: dict[tuple[str, str, str], Stat]  # (task, variant, metric) -> Stat
    defined: list[tuple[str, str]]  # (task, variant) cells the experiment defines at this tier
    rows_total: int = 0
    rows_used: int = 0
    source: Path | None = None


def row_problems(rows: list[dict], table: int, tier: str) -> list[str]:
    """Why a results CSV's rows (``csv.DictReader`` dicts) cannot stand for ``table`` at ``tier``,
    one line each, empty when they can: key columns or ``config_hash`` missing, a line with more or
    fewer fields than the header, a row of another table or tier, a seed that is not an integer, a
    run twice (same task, variant, seed, config hash and process count), a metric that is not a number."""
    from dcnbench.runner.results import KEY_COLUMNS, PROVENANCE_COLUMNS, run_key

    required = KEY_COLUMNS + ["config_hash"]
    lacking = [c for c in required if rows and c not in rows[0]]
    if lacking:
        return [f"lacks column(s) {','.join(lacking)} (a results CSV has {','.join(required)})"]
    bad, runs = [], set()
    for i, r in enumerate(rows, start=2):
        if None in r:
            bad.append(f"line {i}: {len(r[None])} more field(s) than the header")
            continue
        if None in r.values():
            bad.append(f"line {i}: {list(r.values()).count(None)} field(s) fewer than the header")
            continue
        if r["table"] != str(table) or r["tier"] != tier:
            bad.append(f"line {i}: table/tier {r['table']}/{r['tier']}, expected {table}/{tier}")
        if not r["seed"].isdigit():
            bad.append(f"line {i}: seed {r['seed']!r} is not an integer")
        run = run_key(r)
        if run in runs:
            bad.append(f"line {i}: duplicate run {run[:4]}")
        runs.add(run)
        for m, text in r.items():
            if m not in KEY_COLUMNS and m not in PROVENANCE_COLUMNS and text not in (None, ""):
                try:
                    float(text)
                except ValueError:
                    bad.append(f"line {i}: {m}={text!r} is not a number")
    return bad


def load_ours(table: int, tier: str, csv_path: Path | None = None, spec: dict | None = None) -> Ours:
    """Per (task, variant, metric) seed statistics of the results rows matching the current configs
    (their ``definition_hash``: the dataset root and weights file a sweep was given do not count).
    Raises ValueError when the CSV has :func:`row_problems` (e.g. a CSV of another table or tier, or
    a run twice, which would be counted twice), when the matching rows were run by different
    process counts (``--nproc``): with plain BatchNorm their numbers differ, so they are neither
    averaged nor set side by side; or when one cell's rows come from different datasets or weights."""
    from dcnbench.runner.experiment import expand_cells, load_experiment
    from dcnbench.runner.results import KEY_COLUMNS, PROVENANCE_COLUMNS, processes, read_rows

    spec = spec or load_experiment(table)
    cells = expand_cells(spec, tier)
    defined = list(dict.fromkeys((c.task, c.variant) for c in cells))
    hashes = {(c.task, c.variant): c.definition_hash for c in cells}
    path = csv_path or results_csv(table, tier)
    rows = read_rows(path)
    if not rows and path.is_file():
        raise ValueError(f"{path} is not a usable table {table} {tier}-tier results CSV: it has no rows")
    problems = row_problems(rows, table, tier)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{path} is not a usable table {table} {tier}-tier results CSV: "
                         + "; ".join(problems[:3]) + more)
    values: dict[tuple[str, str, str], list[float]] = {}
    used = 0
    counts = set()
    local_inputs: dict[tuple[str, str], set[str]] = {}
    for r in rows:  # rows before the definition_hash column: their config has no local inputs
        if hashes.get((r.get("task"), r.get("variant"))) != (r.get("definition_hash") or r.get("config_hash")):
            continue
        local_inputs.setdefault((r["task"], r["variant"]), set()).add(r.get("config_hash"))
        used += 1
        counts.add(processes(r))
        for metric, text in r.items():
            if metric in KEY_COLUMNS or metric in PROVENANCE_COLUMNS or text in (None, ""):
                continue
            try:
                v = float(text)
            except ValueError:
                continue
            if math.isfinite(v):
                values.setdefault((r["task"], r["variant"], metric), []).append(v)
    if len(counts) > 1:
        raise ValueError(f"{path} holds runs by {sorted(counts)} processes: their numbers are not comparable "
                         "(plain BatchNorm normalises over each process's share of the batch); keep one process "
                         "count per results CSV (ablate --out)")
    mixed = sorted(f"{task}/{variant}" for (task, variant), inputs in local_inputs.items() if len(inputs) > 1)
    if mixed:
        raise ValueError(f"{path} holds runs of {', '.join(mixed)} with different datasets or weights files "
                         "(--data-root, --weights: other config hashes of one definition): the table does not "
                         "average them; keep one per results CSV (ablate --out)")
    stats = {k: Stat.of(v) for k, v in values.items()}
    return Ours(stats, defined, len(rows), used, path)


# ---------------------------------------------------------------------------------------------
# Layout: which of our (task, variant, metric) lands in which paper cell
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    table: int
    title: str
    rows: list[str]
    columns: list[str]
    paper: PaperTable | None
    baseline: dict[str, str]  # row -> its baseline row
    ours: dict[tuple[str, str], Stat] = field(default_factory=dict)  # (row, column) -> Stat
    expected: set[tuple[str, str]] = field(default_factory=set)  # (row, column) we define
    has_ours: bool = True
    footnotes: list[str] = field(default_factory=list)


def _metrics_for(table: int, task: str) -> list[tuple[str, str, str]]:
    """(metric, row-or-empty, column) this table shows for a task; row '' = the variant's row."""
    if table == 2:
        return [(f"effdil_{layer}_{cat}_{s}", layer, f"{cat} {s}") for layer in EFFDIL_LAYERS
                for cat in EFFDIL_CATEGORIES for s in ("mean", "std")]
    if table == 5:
        return [(m, "", c) for m, c in COCO_COLUMNS.items()]
    return [(m, "", c) for (t, m), c in ABLATION_COLUMNS.items() if t == task]


def _variant_row(table: int, task: str, paper_row: str, paper_rows: list[str]) -> str:
    """The paper row a variant stands for. Table 5's rows differ by task: a variant's paper_row
    "Ours" or "plain" becomes "Ours: <task>, ResNet-101" / "<task>, ResNet-101"."""
    if table == 5 and paper_row not in paper_rows:
        base = f"{TASK_LABELS.get(task, task)}, ResNet-101"
        return f"Ours: {base}" if paper_row.lower().startswith("ours") else base
    return paper_row


def build_layout(table: int, tier: str, csv_path: Path | None = None, paper_dir: Path | None = None,
                 experiments_dir: Path | None = None) -> Layout:
    """Paper rows and columns with our statistics placed in them (tables 1, 2, 3, 5, 7)."""
    from dcnbench.runner.experiment import load_experiment

    paper = load_paper_table(table, paper_dir)
    rows, columns = list(paper.rows), list(paper.columns)
    layout = Layout(table, TITLES.get(table, f"Table {table}"), rows, columns, paper, {})
    if table == 5:
        layout.baseline = {r: r[len("Ours: "):] for r in rows if r.startswith("Ours: ") and r[len("Ours: "):] in rows}
    try:
        spec = load_experiment(table, experiments_dir)
    except FileNotFoundError:
        layout.has_ours = False
        what = "ImageNet classification is not reproduced" if table == 7 else f"no experiments/table{table}.toml"
        layout.footnotes.append(f"Paper numbers only: {what}.")
        return layout
    variant_rows = {v["name"]: v.get("paper_row", v["name"]) for v in spec["variants"]}
    ours = load_ours(table, tier, csv_path, spec)
    base_variant = spec.get("baseline") or ""
    if table in (1, 3) and base_variant in variant_rows:
        base_row = variant_rows[base_variant]
        layout.baseline = {r: base_row for r in rows if r != base_row}
    for task, variant in ours.defined:
        vrow = _variant_row(table, task, variant_rows[variant], rows)
        for metric, row, column in _metrics_for(table, task):
            row = row or vrow
            if row not in rows:
                rows.append(row)
            if column not in columns:
                columns.append(column)
            layout.expected.add((row, column))
            stat = ours.stats.get((task, variant, metric))
            if stat is not None:
                layout.ours[(row, column)] = stat
    for row in rows:  # rows added from variants also get their baseline
        if table in (1, 3) and base_variant in variant_rows and row != variant_rows[base_variant]:
            layout.baseline.setdefault(row, variant_rows[base_variant])
    ns = sorted({s.n for s in layout.ours.values()})
    seeds = "no results yet" if not ns else (f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}")
    layout.footnotes.append(f"Ours: {tier} tier, mean ± std over seeds ({seeds}); source {_rel(ours.source)} "
                            f"({ours.rows_used} of {ours.rows_total} rows match the current configs).")
    if layout.baseline:
        layout.footnotes.append("(Δ): difference to the baseline row; ours ± standard error of the difference.")
    if table in (1, 3):
        layout.footnotes.append("Our DeepLab runs on one synthetic dataset, shown beside mIoU@V; mIoU@C is paper-only. "
                                "Detectors: map50 ↔ mAP@0.5, map70 ↔ mAP@0.7.")
    if table == 2:
        from dcnbench.runner.experiment import expand_cells

        buckets = {c.config["eval"].get("dilation_buckets", "terciles") for c in expand_cells(spec, tier)}
        ours_split = ("at box areas 96² and 224² px as the paper's" if buckets == {"paper"} else
                      "at the area terciles of the synthetic objects (equal thirds)")
        layout.footnotes.append("Paper: R-FCN, 3 deformable layers, VOC 2007 test; small / medium / large split at "
                                f"box areas 96² and 224² px. Ours: sizes split {ours_split}; mean over seeds of "
                                "each run's mean / std of effective dilation, ± std over seeds.")
    return layout


def _rel(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        return str(path.resolve().relative_to(RESULTS_DIR.parent))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    table: int
    tier: str
    title: str
    header: list[tuple[str, str]]  # (group, sub) per value column
    rows: list[tuple[str, list[str]]]
    footnotes: list[str]
    records: list[dict]  # long form, one per (row, column) for the csv format


def _num(v: float, d: int) -> str:
    return f"{v:.{d}f}"


def _signed(v: float, d: int) -> str:
    return f"{v:+.{d}f}"


def render_layout(layout: Layout, tier: str) -> Rendered:
    paper = layout.paper
    header: list[tuple[str, str]] = []
    for c in layout.columns:
        header.append((c, "paper"))
        if layout.has_ours:
            header.append((c, "ours"))
    out_rows, records = [], []
    for row in layout.rows:
        cells = []
        base = layout.baseline.get(row)
        for col in layout.columns:
            d = paper.decimals(col) if paper else 1
            pv = paper.get(row, col) if paper else None
            text = NA if pv is None else _num(pv, d)
            pdelta = None
            if pv is not None and base is not None:
                pb = paper.get(base, col)
                if pb is not None:
                    pdelta = pv - pb
                    text += f" ({_signed(pdelta, d)})"
            cells.append(text)
            rec = {"table": layout.table, "tier": tier, "row": row, "column": col, "baseline": base or "",
                   "paper": "" if pv is None else pv, "paper_delta": "" if pdelta is None else round(pdelta, 6)}
            if layout.has_ours:
                stat = layout.ours.get((row, col))
                od = ose = None
                if stat is None:
                    status = MISSING if (row, col) in layout.expected else NA
                    otext = status
                else:
                    status = "ok"
                    otext = _num(stat.mean, d) + ("" if stat.n < 2 else f" ± {_num(stat.std, d)}")
                    if base is not None:
                        bstat = layout.ours.get((base, col))
                        if bstat is None:
                            otext += " (Δ missing)"
                        else:
                            od, ose = stat.mean - bstat.mean, diff_se(stat, bstat)
                            otext += f" ({_signed(od, d)}" + ("" if math.isnan(ose) else f" ± {_num(ose, d)}") + ")"
                cells.append(otext)
                rec.update(ours_status=status, ours_mean="" if stat is None else round(stat.mean, 6),
                           ours_std="" if stat is None or stat.n < 2 else round(stat.std, 6),
                           ours_n="" if stat is None else stat.n, ours_delta="" if od is None else round(od, 6),
                           ours_delta_se="" if ose is None or math.isnan(ose) else round(ose, 6))
            records.append(rec)
        out_rows.append((row, cells))
    return Rendered(layout.table, tier, f"Table {layout.table}: {layout.title}", header, out_rows,
                    list(layout.footnotes), records)


def to_markdown(r: Rendered) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"### {esc(r.title)} ({r.tier} tier)", ""]
    lines.append("| | " + " | ".join(esc(f"{g} · {s}") for g, s in r.header) + " |")
    lines.append("|---|" + "---:|" * len(r.header))
    for label, cells in r.rows:
        lines.append(f"| {esc(label)} | " + " | ".join(esc(c) for c in cells) + " |")
    if r.footnotes:
        lines.append("")
        lines += [f"- {esc(n)}" for n in r.footnotes]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex(s: str) -> str:
    s = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in s)
    return s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--").replace("↔", r"$\leftrightarrow$")


def to_latex(r: Rendered) -> str:
    groups: list[tuple[str, int]] = []
    for g, _ in r.header:
        if groups and groups[-1][0] == g:
            groups[-1] = (g, groups[-1][1] + 1)
        else:
            groups.append((g, 1))
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * len(r.header) + "}", r"\toprule"]
    lines.append(" & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{_latex(g)}}}" for g, n in groups) + r" \\")
    start, rules = 2, []
    for _, n in groups:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    lines.append(" & " + " & ".join(_latex(s) for _, s in r.header) + r" \\")
    lines.append(r"\midrule")
    for label, cells in r.rows:
        lines.append(_latex(label) + " & " + " & ".join(_latex(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = _latex(f"{r.title} ({r.tier} tier). " + " ".join(r.footnotes))
    lines += [rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(r: Rendered) -> str:
    keys: list[str] = []
    for rec in r.records:
        keys += [k for k in rec if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.records)
    return buffer.getvalue()


def to_rich(r: Rendered, width: int = 200) -> list:
    """rich Tables (labels are plain text, never markup), the columns split into as many tables
    as it takes to fit ``width``, a paper column's paper/ours pair never split."""
    from rich.table import Table
    from rich.text import Text

    def cell_width(i: int) -> int:
        longest = max([len(cells[i]) for _, cells in r.rows] + [len(r.header[i][1])])
        return min(max(longest, 8), 24) + 3

    label_w = max([len(label) for label, _ in r.rows] + [4]) + 4
    groups: list[list[int]] = []
    for i, (g, _) in enumerate(r.header):
        if groups and r.header[groups[-1][0]][0] == g:
            groups[-1].append(i)
        else:
            groups.append([i])
    chunks: list[list[int]] = [[]]
    used = label_w
    for grp in groups:
        w = sum(cell_width(i) for i in grp)
        if chunks[-1] and used + w > width:
            chunks.append([])
            used = label_w
        chunks[-1] += grp
        used += w
    tables = []
    for k, chunk in enumerate(chunks):
        part = f" [{k + 1}/{len(chunks)}]" if len(chunks) > 1 else ""
        last = k == len(chunks) - 1
        t = Table(title=Text(f"{r.title} ({r.tier} tier){part}"),
                  caption=Text("\n".join(r.footnotes)) if last else None, caption_justify="left")
        t.add_column(Text(""), no_wrap=True)
        for i in chunk:
            g, sub = r.header[i]
            t.add_column(Text(f"{g}\n{sub}"), justify="right", style="dim" if sub == "paper" else None)
        for label, cells in r.rows:
            t.add_row(Text(label), *[Text(cells[i], style="bold red" if cells[i] == MISSING else "") for i in chunk])
        tables.append(t)
    return tables


def format_rendered(r: Rendered, fmt: str) -> str:
    if fmt == "markdown":
        return to_markdown(r)
    if fmt == "latex":
        return to_latex(r)
    if fmt == "csv":
        return to_csv(r)
    if fmt == "console":
        from rich.console import Console

        console = Console(record=True, width=160, file=io.StringIO())
        for t in to_rich(r, 160):
            console.print(t)
        return console.export_text()
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


# ---------------------------------------------------------------------------------------------
# Table 4: parameters and runtime from the benchmark CSVs
# ---------------------------------------------------------------------------------------------

T4_PARAMS = "# params"
T4_FORWARD = "net. forward (sec)"
T4_RUNTIME = "runtime (sec)"


def _t4_model(name: str) -> str | None:
    """Canonical model key for a paper row label or a benchmark ``model`` value."""
    s = re.sub(r"[^a-z0-9@]", "", name.lower())
    if "deeplab" in s:
        tail = s.split("deeplab", 1)[1]
        if tail.startswith(("@c", "c", "city")):
            return "deeplab@c"
        if tail.startswith(("@v", "v", "voc")):
            return "deeplab@v"
        return "deeplab"
    if "faster" in s:
        return "faster"
    if "rfcn" in s:
        return "rfcn"
    if "rpn" in s:
        return "rpn"
    return None


def _t4_is_ours(variant: str) -> bool:
    s = variant.lower()
    return re.search(r"\bours\b", s) is not None or "deform" in s or "dcn" in s


def _t4_paper_pairs(paper: PaperTable) -> list[tuple[str, str, str | None]]:
    """(model key, paper row, baseline row or None) in paper order; an "Ours" row follows its plain row."""
    out, last_plain = [], None
    for row in paper.rows:
        if _t4_is_ours(row) and last_plain is not None:
            out.append((_t4_model(last_plain[1]) or last_plain[1], row, last_plain[1]))
        else:
            last_plain = (None, row)
            out.append((_t4_model(row) or row, row, None))
    return out


def _find_column(columns: list[str], *needles: str) -> str | None:
    for c in columns:
        low = c.lower()
        if all(n in low for n in needles):
            return c
    return None


_PAPER_SIZE_RUNTIME_CSV = re.compile(r"table4_runtime_[a-z]+\.csv")


def _runtime_csv_scale(path: Path) -> float:
    """The input scale a runtime CSV holds: ``table4_runtime_<device>_scale<s>.csv``, else 1 (paper sizes)."""
    m = re.search(r"_scale([0-9.]+)\.csv$", path.name)
    return float(m.group(1)) if m else 1.0


_RUNTIME_CSV_COLUMNS = ("model", "variant", "net_forward_s", "runtime_s")


def _runtime_rows(path: Path) -> tuple[list[dict], int]:
    """The rows of a runtime CSV to show: those at the file's scale, the newest per (model, variant),
    so a table never averages runs of different sizes, round counts or code; and how many were left out.
    ValueError if ``path`` lacks a runtime CSV's columns (e.g. an ops or ablation CSV)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _RUNTIME_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not a `dcnbench runtime` CSV: it has no {', '.join(missing)} column(s)")
        rows = list(reader)
    scale = _runtime_csv_scale(path)
    newest: dict[tuple[str, str], dict] = {}
    for r in sorted(rows, key=lambda r: r.get("date") or ""):  # stable: the later row of a date wins
        if float(r.get("scale") or 1) == scale:
            newest[(r.get("model", ""), r.get("variant", ""))] = r
    return list(newest.values()), len(rows) - len(newest)


_RUNTIME_SETTINGS = ("device", "repeats", "backend", "threads", "weights_sha256")


def _mixed_settings(rows: list[dict]) -> str:
    """The run settings in which ``rows`` differ, with their values ("threads 1, 1024"), or ""."""
    parts = []
    for column in _RUNTIME_SETTINGS:
        values = sorted({r.get(column) or "" for r in rows})
        if len(values) > 1:
            shown = [v[:12] if column == "weights_sha256" else v for v in values]
            parts.append(f"{column} {', '.join(v or 'none' for v in shown)}")
    return "; ".join(parts)


def build_table4(results_dir: Path | None = None, paper_dir: Path | None = None, tier: str = "cpu",
                 runtime_csv: Path | None = None) -> Rendered:
    """Table 4 beside our params (M) and times per device, with Ours/plain overhead ratios.

    Times come from ``runtime_csv``, or else from every paper-size ``table4_runtime_<device>.csv`` in
    ``results_dir`` (a scaled run's ``..._scale<s>.csv`` only when named); params from the
    ``table4_params.csv`` beside them. A scaled CSV's table has the tier ``<tier>_scale<s>``, so its
    markdown never replaces the paper-size ``table4_<tier>.md``."""
    from dcnbench.runner.results import read_rows

    if runtime_csv is not None:
        results_dir = runtime_csv.parent
    results_dir = results_dir or RESULTS_DIR
    paper = load_paper_table(4, paper_dir)
    pcol_params = _find_column(paper.columns, "param")
    pcol_fwd = _find_column(paper.columns, "forward")
    pcol_run = _find_column(paper.columns, "runtime")
    params_rows = read_rows(results_dir / "table4_params.csv")
    runtime_files = ([runtime_csv] if runtime_csv is not None else
                     sorted(p for p in results_dir.glob("table4_runtime_*.csv") if _PAPER_SIZE_RUNTIME_CSV.fullmatch(p.name)))

    def key(model: str, variant: str) -> tuple[str | None, bool]:
        return _t4_model(model), _t4_is_ours(variant)

    params: dict[tuple, list[float]] = {}
    for r in params_rows:
        try:
            params.setdefault(key(r["model"], r["variant"]), []).append(float(r["params"]))
        except (KeyError, ValueError):
            continue
    devices: dict[str, dict[tuple, dict[str, list[float]]]] = {}
    left_out, mixed = {}, {}
    for path in runtime_files:
        rows_shown, left_out[path] = _runtime_rows(path)
        mixed[path] = _mixed_settings(rows_shown)
        scale = _runtime_csv_scale(path)
        for r in rows_shown:
            dev = (r.get("device") or path.stem[len("table4_runtime_"):]) + ("" if scale == 1 else f", scale {scale:g}")
            slot = devices.setdefault(dev, {}).setdefault(key(r.get("model", ""), r.get("variant", "")), {})
            for col in ("net_forward_s", "runtime_s"):
                try:
                    slot.setdefault(col, []).append(float(r[col]))
                except (KeyError, ValueError, TypeError):
                    pass

    def mean(vals: list[float] | None) -> float | None:
        return sum(vals) / len(vals) if vals else None

    header = [(T4_PARAMS, "paper (M)"), (T4_PARAMS, "ours (M)")]
    for dev in devices or {"-": {}}:
        header += [(T4_FORWARD, "paper"), (T4_FORWARD, f"ours [{dev}]")] if dev != "-" else [(T4_FORWARD, "paper"), (T4_FORWARD, "ours")]
        header += [(T4_RUNTIME, "paper"), (T4_RUNTIME, f"ours [{dev}]")] if dev != "-" else [(T4_RUNTIME, "paper"), (T4_RUNTIME, "ours")]

    def ratio_text(v: float | None, b: float | None) -> str:
        return "" if v is None or b is None or b == 0 else f" (×{v / b:.3f})"

    rows, records = [], []
    pairs = _t4_paper_pairs(paper)
    for model, row, base in pairs:
        ours_flag = base is not None
        k = (model, ours_flag)
        kb = (model, False)
        cells = []

        def paper_cell(col: str | None, d: int) -> tuple[str, float | None]:
            v = paper.get(row, col) if col else None
            b = paper.get(base, col) if (col and base) else None
            return (NA if v is None else _num(v, d) + ratio_text(v, b)), v

        def ours_cell(v: float | None, b: float | None, d: int) -> str:
            return MISSING if v is None else _num(v, d) + (ratio_text(v, b) if ours_flag else "")

        ptext, pv = paper_cell(pcol_params, 1)
        ov = mean(params.get(k))
        ob = mean(params.get(kb))
        ov_m, ob_m = (None if ov is None else ov / 1e6), (None if ob is None else ob / 1e6)
        cells += [ptext, ours_cell(ov_m, ob_m, 3)]
        records.append({"table": 4, "row": row, "column": T4_PARAMS, "device": "", "paper": pv if pv is not None else "",
                        "ours": "" if ov_m is None else round(ov_m, 6),
                        "paper_ratio": _ratio(pv, paper.get(base, pcol_params) if base and pcol_params else None),
                        "ours_ratio": _ratio(ov_m, ob_m) if ours_flag else ""})
        for dev, slots in (devices or {"-": {}}).items():
            for pcol, ocol, label in ((pcol_fwd, "net_forward_s", T4_FORWARD), (pcol_run, "runtime_s", T4_RUNTIME)):
                ptext, pv = paper_cell(pcol, 3)
                ov = mean(slots.get(k, {}).get(ocol))
                ob = mean(slots.get(kb, {}).get(ocol))
                cells += [ptext, ours_cell(ov, ob, 4)]
                records.append({"table": 4, "row": row, "column": label, "device": "" if dev == "-" else dev,
                                "paper": pv if pv is not None else "", "ours": "" if ov is None else round(ov, 6),
                                "paper_ratio": _ratio(pv, paper.get(base, pcol) if base and pcol else None),
                                "ours_ratio": _ratio(ov, ob) if ours_flag else ""})
        rows.append((row, cells))
    notes = ["(×r): overhead ratio of the deformable model over its plain counterpart.",
             "Paper: ResNet-101, Intel E5-2650 v2 CPU and Nvidia K40 GPU. Ours: "
             + (f"params from {_rel(results_dir / 'table4_params.csv')}" if params_rows else "no params CSV yet")
             + "; " + (", ".join(f"{_rel(p)} ({_machines(p)})" for p in runtime_files) if runtime_files
                       else "no runtime CSVs yet") + "."]
    notes += [f"{_rel(p)}: {n} row(s) left out (another scale, or an older run of the same model and variant)."
              for p, n in left_out.items() if n]
    notes += [f"{_rel(p)}: the rows shown come from runs with different settings ({text}): their times do not "
              f"compare across models." for p, text in mixed.items() if text]
    scales = {_runtime_csv_scale(p) for p in runtime_files} - {1.0}
    tier += "".join(f"_scale{s:g}" for s in sorted(scales))
    return Rendered(4, tier, f"Table 4: {TITLES[4]}", header, rows, notes, records)


def _machines(path: Path) -> str:
    """The machines (and float32 modes, where recorded) a runtime CSV was measured on."""
    from dcnbench.runner.results import read_rows

    names = {r.get("machine", "") + (f", {r['float32_mode']}" if r.get("float32_mode") else "") for r in read_rows(path)}
    return "; ".join(sorted(n for n in names if n)) or "machine not recorded"


def _ratio(v: float | None, b: float | None):
    return "" if v is None or b is None or b == 0 else round(v / b, 6)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def render_table(table: int, tier: str = "cpu", csv_path: Path | None = None, results_dir: Path | None = None,
                 paper_dir: Path | None = None, experiments_dir: Path | None = None) -> Rendered:
    if table == 4:
        return build_table4(results_dir, paper_dir, tier, runtime_csv=csv_path)
    layout = build_layout(table, tier, csv_path, paper_dir, experiments_dir)
    return render_layout(layout, tier)


def write_markdown(r: Rendered, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"table{r.table}_{r.tier}.md"
    path.write_text(to_markdown(r))
    return path
