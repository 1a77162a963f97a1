"""Tables and the README performance section from ``results/bench/ops_<device>.csv``.

``python -m dcnbench.bench.report results/bench/ops_cpu.csv --readme README.md`` replaces the block
between ``<!-- bench:results/bench/ops_cpu.csv:start -->`` and ``<!-- bench:results/bench/ops_cpu.csv:end -->``
in the README with the section rendered from the CSV (every number comes from that one run); each
CSV has its own block.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Iterable
from pathlib import Path

NATIVE = "dcnbench-native"
NATIVE_MASKED = "dcnbench-native-modulated"


def markers(csv_name: str) -> tuple[str, str]:
    """The README block of one CSV."""
    return f"<!-- bench:{csv_name}:start -->", f"<!-- bench:{csv_name}:end -->"


# Issue 3's targets, all forward+backward: (ratio to F.conv2d at most, speed-up over torchvision at least).
CONV_TARGETS = {"res5": (1.4, 4.0), "mid": (1.4, 4.0), "small": (2.0, 15.0), "tiny": (3.0, 15.0)}
ROI_TARGET = 4.0
MASK_TARGET = 1.10


BENCH_COLUMNS = ("op", "implementation", "shape", "pass", "threads")


def read_rows(path: Path | str) -> list[dict]:
    """The rows of a ``dcnbench bench ops`` CSV; ValueError naming the file when it is not one."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BENCH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not a 'dcnbench bench ops' CSV: no column {', '.join(missing)}")
        return list(reader)


def _index(rows: Iterable[dict]) -> dict[tuple, dict]:
    return {(r["op"], r["implementation"], r["shape"], r["pass"], int(r["threads"])): r for r in rows}


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """One entry per target and thread count: what, measured value, limit, met. A conv target is
    judged only on rows of its own shape (``shape_desc`` of the built-in dims), whatever the name."""
    from .ops import CONV_SHAPES, conv_desc

    idx = _index(r for r in rows if r["op"] != "deform_conv2d" or r["shape"] not in CONV_SHAPES
                 or r["shape_desc"] == conv_desc(CONV_SHAPES[r["shape"]]))
    threads = sorted({int(r["threads"]) for r in rows})
    checks = []
    fb = "forward+backward"
    for t in threads:
        for shape, (max_ratio, min_speedup) in CONV_TARGETS.items():
            r = idx.get(("deform_conv2d", NATIVE, shape, fb, t))
            if r is None:
                continue
            ratio = float(r["ratio_to_baseline"])
            checks.append({"target": f"deform_conv2d {shape} ≤ {max_ratio}× F.conv2d", "threads": t,
                           "value": f"{ratio:.2f}×", "met": ratio <= max_ratio})
            if r["speedup_vs_torchvision"]:
                sp = float(r["speedup_vs_torchvision"])
                checks.append({"target": f"deform_conv2d {shape} ≥ {min_speedup:g}× faster than torchvision",
                               "threads": t, "value": f"{sp:.1f}×", "met": sp >= min_speedup})
            m = idx.get(("deform_conv2d", NATIVE_MASKED, shape, fb, t))
            if m is not None:
                rel = float(m["ms"]) / float(r["ms"])
                checks.append({"target": f"modulated within 10% of unmasked ({shape})", "threads": t,
                               "value": f"{rel:.2f}×", "met": rel <= MASK_TARGET})
        for op, shape, base in (("deform_ps_roi_pool", "rfcn", "ps_roi_align"),
                                ("deform_roi_pool", "faster-rcnn", "roi_align")):
            r = idx.get((op, NATIVE, shape, fb, t))
            if r is None:
                continue
            sp = float(r["speedup_vs_torchvision"])
            checks.append({"target": f"{op} ≥ {ROI_TARGET:g}× faster than torchvision {base} (fwd+bwd)",
                           "threads": t, "value": f"{sp:.1f}×", "met": sp >= ROI_TARGET})
    return checks


def _ms(value: str) -> str:
    """Milliseconds with three significant digits or more (GPU timings are fractions of a ms)."""
    v = float(value)
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _conv_summary(rows: list[dict]) -> list[list[str]]:
    idx = _index(rows)
    out = []
    shapes = [s for s in dict.fromkeys(r["shape"] for r in rows if r["op"] == "deform_conv2d" and r["peak_rss_mb"] == "")]
    for t in sorted({int(r["threads"]) for r in rows}):
        for shape in shapes:
            cells = [shape, str(t)]
            for p in ("forward", "forward+backward"):
                conv = idx.get(("deform_conv2d", "F.conv2d", shape, p, t))
                nat = idx.get(("deform_conv2d", NATIVE, shape, p, t))
                tv = idx.get(("deform_conv2d", "torchvision", shape, p, t))
                if conv is None or nat is None:
                    cells += ["", "", ""]
                    continue
                cells.append(f"{_ms(conv['ms'])} / {_ms(nat['ms'])}")
                cells.append(f"{float(nat['ratio_to_baseline']):.2f}×")
                cells.append(f"{_ms(tv['ms'])} ms, {float(nat['speedup_vs_torchvision']):.2f}×" if tv else "")
            masked = idx.get(("deform_conv2d", NATIVE_MASKED, shape, "forward+backward", t))
            nat = idx.get(("deform_conv2d", NATIVE, shape, "forward+backward", t))
            cells.append(f"{float(masked['ms']) / float(nat['ms']):.2f}×" if masked and nat else "")
            out.append(cells)
    return out


def _roi_summary(rows: list[dict]) -> list[list[str]]:
    idx = _index(rows)
    out = []
    for op, shape, base in (("deform_ps_roi_pool", "rfcn", "ps_roi_align"), ("deform_roi_pool", "faster-rcnn", "roi_align")):
        for t in sorted({int(r["threads"]) for r in rows}):
            cells = [op, str(t)]
            present = False
            for p in ("forward", "forward+backward"):
                b, n = idx.get((op, base, shape, p, t)), idx.get((op, NATIVE, shape, p, t))
                if b is None or n is None:
                    cells += ["", ""]
                    continue
                present = True
                cells += [f"{_ms(b['ms'])} / {_ms(n['ms'])}", f"{float(n['speedup_vs_torchvision']):.2f}×"]
            if present:
                out.append(cells)
    return out


def _memory_summary(rows: list[dict]) -> list[list[str]]:
    return [[r["implementation"], r["threads"], f"{float(r['ms']):.0f}", r["peak_rss_mb"], r["shape_desc"]]
            for r in rows if r["peak_rss_mb"]]


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


CONV_HEADER = ["shape", "threads", "fwd ms conv2d / native", "fwd ratio", "fwd torchvision, native speed-up",
               "fwd+bwd ms conv2d / native", "fwd+bwd ratio", "fwd+bwd torchvision, native speed-up",
               "modulated / plain (fwd+bwd)"]
ROI_HEADER = ["op", "threads", "fwd ms torchvision / native", "fwd speed-up", "fwd+bwd ms torchvision / native",
              "fwd+bwd speed-up"]


def render_markdown(rows: list[dict], csv_name: str = "results/bench/ops_cpu.csv") -> str:
    first = rows[0]
    on_cuda = first["device"].startswith("cuda")
    checks = [] if on_cuda else evaluate_targets(rows)  # issue 3's targets are CPU targets
    met = [c for c in checks if c["met"]]
    missed = [c for c in checks if not c["met"]]
    source = (f"Generated from `{csv_name}` by `python -m dcnbench.bench.report` (measured with `dcnbench bench ops"
              + (" --device cuda" + (" --tf32" if first.get("float32_mode") == "tf32" else "") if on_cuda else "")
              + f"`): {first['machine']}, torch {first['torch']}, torchvision {first['torchvision']}, commit "
              f"{first['git_commit']}, {first['date']}. Median of interleaved rounds; ratios compare runs in the same "
              "process")
    if on_cuda:
        source += (f". float32 tensors, {first.get('float32_mode') or 'fp32'} arithmetic in cuDNN and cuBLAS alike. "
                   f"Each timing synchronizes the device before and after, so it includes the host's launch work "
                   f"({first['nproc']} host CPUs), which sets the time of small cases. `native` is the CUDA kernel "
                   "backend here.")
    else:
        source += (f" at the same thread count ({first['nproc']} CPUs). float32. The CSV's `loadavg` column is the "
                   "machine's 1-minute load when each case finished: other jobs shared these CPUs, which inflates "
                   "and skews the 2-thread numbers most.")
    parts = [
        source + f" Regenerate: `python -m dcnbench.bench.report {csv_name} --readme README.md`.",
        "",
        "**deform_conv2d** (3×3, offsets ~ N(0, 1.5²) px) against `F.conv2d` of the same shape and "
        "`torchvision.ops.deform_conv2d`:",
        "",
        _md_table(CONV_HEADER, _conv_summary(rows)),
    ]
    roi = _roi_summary(rows)
    if roi:
        parts += ["", "**Deformable (PS) RoI pooling** (300 RoIs, 7×7, 4×4 samples per bin) against torchvision's "
                  "`ps_roi_align` / `roi_align` at the same samples per bin:", "", _md_table(ROI_HEADER, roi)]
    mem = _memory_summary(rows)
    if mem:
        parts += ["", "**Memory** (forward+backward in a fresh process; peak RSS includes the inputs):", "",
                  _md_table(["implementation", "threads", "ms", "peak RSS MB", "case"], mem)]
    if checks:
        parts += ["", f"**Targets of issue 3: {len(met)} of {len(checks)} checks met.**"]
    if missed:
        parts += ["", "Missed:", ""] + [f"- {c['target']}, {c['threads']} thread(s): {c['value']}" for c in missed]
    if met:
        parts += ["", "<details><summary>Met</summary>", ""]
        parts += [f"- {c['target']}, {c['threads']} thread(s): {c['value']}" for c in met]
        parts += ["", "</details>"]
    return "\n".join(parts) + "\n"


def render_tables(rows: list[dict]) -> list:
    """Rich tables of the conv and (when measured) RoI summaries, for the terminal: each under its
    own header, as in the markdown."""
    from rich.table import Table

    def table(title: str, header: list[str], body: list[list[str]]) -> Table:
        t = Table(title=title)
        for h in header:
            t.add_column(h)
        for row in body:
            t.add_row(*row)
        return t

    tables = [table("deform_conv2d (ms; ratio = native / F.conv2d; speed-up = torchvision / native)", CONV_HEADER,
                    _conv_summary(rows))]
    roi = _roi_summary(rows)
    if roi:
        tables.append(table("deformable (PS) RoI pooling (ms; speed-up = torchvision's roi_align / native)",
                            ROI_HEADER, roi))
    return tables


def update_readme(readme: Path | str, csv_path: Path | str) -> None:
    """Replace the CSV's block in ``readme`` (appended under a new "## Performance" heading when it
    has none); the block is named by the CSV's path relative to the README's folder, however the
    path was typed."""
    readme = Path(readme)
    text = readme.read_text()
    rows = read_rows(csv_path)
    name = Path(os.path.relpath(Path(csv_path).resolve(), readme.resolve().parent)).as_posix()
    start, end = markers(name)
    block = f"{start}\n{render_markdown(rows, name)}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv", nargs="?", default="results/bench/ops_cpu.csv")
    parser.add_argument("--readme", help="README to update in place (between the CSV's bench markers)")
    args = parser.parse_args(argv)
    try:
        if args.readme:
            update_readme(args.readme, args.csv)
        else:
            print(render_markdown(read_rows(args.csv), args.csv))
    except (OSError, ValueError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
