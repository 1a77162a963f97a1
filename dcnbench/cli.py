"""The ``dcnbench`` command line: a thin Click layer over the library."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from dcnbench.report.paper import RESULTS_DIR  # the checkout's results/, where table, figures and check read


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dcnbench")
def main() -> None:
    """Deformable ConvNets (Dai et al., 2017): fast deformable ops and the paper's ablations."""
    backend = os.environ.get("DCNBENCH_BACKEND")
    if backend and backend not in ("reference", "native", "cuda"):
        raise click.UsageError(f"the environment variable DCNBENCH_BACKEND must be reference, native or cuda, "
                               f"got {backend!r}")


class OutputDir(click.Path):
    """A folder the command writes into (created when it first writes): a usage error naming the
    option, before anything runs, when it could not be created (a file in the way, no permission)."""

    name = "directory"

    def __init__(self) -> None:
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        path = Path(super().convert(value, param, ctx))
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            self.fail(f"cannot create folder {str(path)!r}: {str(existing)!r} is a file", param, ctx)
        if not os.access(existing, os.W_OK | os.X_OK):
            self.fail(f"cannot create folder {str(path)!r}: {str(existing)!r} is not writable", param, ctx)
        return str(path)


def _usage_error(exc: ValueError) -> click.BadParameter:
    """A library error whose ``fields`` name the settings at fault, as a usage error naming their options."""
    return click.BadParameter(str(exc), param_hint=[f"--{f.replace('_', '-')}" for f in exc.fields])


@contextlib.contextmanager
def _exit_130_on_interrupt(message: str | None = None):
    """Ctrl-C: print ``message`` (what was kept, how to resume; None: the command said it) and exit
    130, the shell's code for an interrupt, instead of Click's "Aborted!" and 1."""
    try:
        yield
    except KeyboardInterrupt:
        if message and os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets Ctrl-C: one says it
            click.echo(f"\ninterrupted: {message}", err=True)
        raise SystemExit(130) from None


def _require_checkout() -> None:
    """The commands that read ``experiments/`` and the committed ``results/`` need the repository's
    checkout beside the package (an editable install); a wheel has neither."""
    from dcnbench.report.paper import RESULTS_DIR
    from dcnbench.runner.experiment import EXPERIMENTS_DIR

    if not (EXPERIMENTS_DIR.is_dir() and (RESULTS_DIR / "paper").is_dir()):
        raise click.ClickException(f"this command reads {EXPERIMENTS_DIR} and {RESULTS_DIR / 'paper'}, which this "
                                   "installation lacks: install dcnbench editable from a clone of its repository "
                                   "(pip install -e .)")


def _parsed_by(parse):
    """A Click callback returning ``parse(value)``; its ValueError becomes a usage error naming the option."""
    def callback(ctx: click.Context, param: click.Parameter, value):
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from exc
    return callback


def _finite(value: float) -> float:
    """A float option's value, NaN refused (click's FloatRange lets it through: it compares false)."""
    if value != value:
        raise ValueError("must be a number, got nan")
    return value


def _shapes(specs: tuple[str, ...]) -> dict | None:
    from dcnbench.bench.ops import parse_shape

    parsed = [parse_shape(spec) for spec in specs]
    names = [name for name, _ in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each shape needs its own name, {', '.join(repeated)} is given twice")
    return dict(parsed) or None


_MAX_THREADS = 1024  # torch.set_num_threads overflows far above it (a traceback, not a usage error)


def _threads(spec: str) -> list[int]:
    from dcnbench.bench.ops import parse_threads

    threads = parse_threads(spec)
    if max(threads) > _MAX_THREADS:
        raise ValueError(f"thread counts must be at most {_MAX_THREADS}, got {max(threads)}")
    return threads


def _device(device: str) -> str:
    from dcnbench.bench.ops import check_device

    return check_device(device)


@main.command()
def backends() -> None:
    """Show which operator backends are available here (reference, native CPU, CUDA)."""
    from rich.console import Console
    from rich.table import Table

    from dcnbench.ops import available_backends

    table = Table(title="dcnbench operator backends")
    table.add_column("backend")
    table.add_column("status")
    for name, status in available_backends().items():
        table.add_row(name, status)
    Console().print(table)


@main.group()
def bench() -> None:
    """Benchmarks of the operators."""


@bench.command("ops")
@click.option("--shapes", "shapes", multiple=True, metavar="NAME=N,C,H,W,O[,DIL]", callback=_parsed_by(_shapes),
              help="deform_conv2d shapes to run instead of res5/mid/small/tiny (repeatable).")
@click.option("--threads", default="1,2", show_default=True, callback=_parsed_by(_threads),
              help="Comma-separated CPU thread counts.")
@click.option("--device", default="cpu", show_default=True, callback=_parsed_by(_device),
              help="cpu, or cuda[:i] (times the CUDA backend).")
@click.option("--repeats", type=click.IntRange(3), default=7, show_default=True, help="Interleaved rounds (median).")
@click.option("--reference", "with_reference", is_flag=True, help="Also time the pure-PyTorch reference.")
@click.option("--no-roi", is_flag=True, help="Skip the RoI pooling cases.")
@click.option("--no-memory", is_flag=True, help="Skip the batch-64 peak-RSS case.")
@click.option("--tf32", is_flag=True, help="CUDA: cuDNN and cuBLAS in TF32 (default: both in full float32).")
@click.option("--out", type=OutputDir(), default=str(RESULTS_DIR / "bench" if (RESULTS_DIR / "paper").is_dir()
                                                   else Path("results") / "bench"), show_default=True,
              help="Output folder (a wheel install, without the checkout's results/, writes ./results/bench).")
def bench_ops(shapes, threads, device, repeats, with_reference, no_roi, no_memory, tf32, out) -> None:
    """Time deform_conv2d and deformable (PS) RoI pooling against torchvision and F.conv2d / roi_align;
    writes <out>/ops_<device>.csv."""
    from dcnbench.bench.ops import MEMORY_SHAPE, run_ops_benchmark

    if tf32 and not device.startswith("cuda"):
        raise click.BadParameter("TF32 applies to CUDA devices only (add --device cuda)", param_hint="--tf32")
    if shapes and MEMORY_SHAPE[0] in shapes and not no_memory and not device.startswith("cuda"):
        raise click.BadParameter(f"{MEMORY_SHAPE[0]} is the memory case, which a CPU run measures in fresh processes "
                                 "under that name: add --no-memory or give the shape another name",
                                 param_hint="--shapes")
    with _exit_130_on_interrupt():  # run_ops_benchmark says which passes it kept
        path = run_ops_benchmark(shapes, threads, device, out, repeats, with_reference=with_reference,
                                 with_roi=not no_roi, with_memory=not no_memory, tf32=tf32)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--table", type=click.IntRange(1, 3), required=True, help="Paper table to reproduce (1, 2 or 3).")
@click.option("--task", "tasks", multiple=True, type=click.Choice(["deeplab", "rpn", "faster", "rfcn"]),
              help="Restrict to these tasks (repeatable); default: all of the table's tasks.")
@click.option("--variant", "variants", multiple=True,
              help="Restrict to these variants (repeatable, names as in experiments/table<N>.toml).")
@click.option("--tier", type=click.Choice(["smoke", "cpu", "paper"]), default="cpu", show_default=True,
              help="smoke: minutes; cpu: the CPU-scale reproduction; paper: ResNet-101 on the real datasets.")
@click.option("--seeds", type=click.IntRange(1), help="Seeds per cell (default: the tier's).")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True, help="Cells run in parallel processes.")
@click.option("--out", type=OutputDir(), default=str(RESULTS_DIR / "ablate"), show_default=True,
              help="Output folder: table<N>_<tier>.csv, logs/ and checkpoints/ go here.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), help="Root of the real datasets (paper tier).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="ImageNet ResNet-101 state dict (paper tier).")
@click.option("--nproc", type=click.IntRange(1), help="Train each cell data-parallel in N processes on this node "
              "(launches torchrun: one per GPU with NCCL, else gloo on the CPU; --jobs is then unused).")
def ablate(table, tasks, variants, tier, seeds, jobs, out, data_root, weights, nproc) -> None:
    """Rerun an ablation of the paper: one CSV row per finished run, resumable."""
    _require_checkout()
    from dcnbench.runner import distributed as dist
    from dcnbench.runner.ablate import ablation_cells, check_results_csv, run_ablation
    from dcnbench.errors import InvalidSetting

    # Under torchrun (the command relaunched by --nproc) rank 0 alone builds and checks the cells (it
    # opens the datasets and hashes the weights file, which the launching process did too) and sends
    # them to the others; a usage error ends rank 0, and torchrun then stops the rest.
    main = not dist.init_from_env() or dist.is_main()
    try:  # before any run or launch
        cells = None
        if main:
            cells = ablation_cells(table, tier, list(tasks), seeds, data_root, weights, variants=list(variants))
            check_results_csv(out, cells, nproc or int(os.environ.get("WORLD_SIZE", "1")))  # a torchrun rank: its job's
        cells = dist.broadcast(cells)
    except InvalidSetting as exc:
        raise _usage_error(exc) from exc
    uneven = sorted({c.config["train"]["batch_size"] for c in cells if nproc and c.config["train"]["batch_size"] % nproc})
    if uneven:
        raise click.BadParameter(f"{nproc} processes cannot share a global batch of {uneven[0]} images evenly "
                                 f"(tier {tier})", param_hint="--nproc")
    if nproc:
        with _exit_130_on_interrupt():  # the ranks say what they kept
            raise SystemExit(_relaunch_under_torchrun(click.get_current_context(), nproc))
    with _exit_130_on_interrupt(f"the finished runs are in {out}/table{table}_{tier}.csv; the same command "
                                "resumes with the others"):
        failed = run_ablation(cells, jobs, out)
    if failed:
        raise SystemExit(1)


def _relaunch_under_torchrun(ctx: click.Context, nproc: int) -> int:
    """Run this same command (without --nproc) as ``torchrun --standalone --nproc-per-node N``; its
    rows record the command as typed. On Ctrl-C (which the ranks get too) wait for them to stop."""
    import subprocess
    import sys

    from dcnbench.runner.results import LAUNCHED_AS, command_line

    if "RANK" in os.environ:
        raise click.UsageError("--nproc starts torchrun itself; under torchrun leave it out")
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "nproc" or not isinstance(param, click.Option) or value is None or value == ():
            continue
        if param.is_flag:
            args += [param.opts[0]] if value else param.secondary_opts[:1]
            continue
        for v in value if param.multiple else [value]:
            args += [param.opts[0], str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "dcnbench.cli", ctx.info_name, *args]
    click.echo(" ".join(cmd), err=True)
    process = subprocess.Popen(cmd, env={**os.environ, LAUNCHED_AS: command_line()})
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.wait()
        raise


@main.group()
def data() -> None:
    """Datasets: generate the synthetic benchmark (real datasets are read from --data-root)."""


@data.command()
@click.option("--task", type=click.Choice(["seg", "det"]), default="seg", show_default=True,
              help="seg: VOC segmentation layout; det: COCO layout (or VOC with --layout voc).")
@click.option("--num", type=click.IntRange(1), default=2000, show_default=True, help="Number of images.")
@click.option("--size", type=click.IntRange(8), default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("--out", type=OutputDir(), required=True,
              help="Output folder (only it is written): new, empty, or holding this same dataset (else refused).")
@click.option("--classes", type=click.IntRange(1, 10), default=6, show_default=True, help="Number of shape classes.")
@click.option("--min-size", type=click.FloatRange(0, min_open=True), callback=_parsed_by(_finite),
              help="Smallest object extent in px, at least 3.91 (a 12-pixel disc) [default: size/16, at least 3.91].")
@click.option("--max-size", type=click.FloatRange(0, min_open=True), callback=_parsed_by(_finite),
              help="Largest object extent in px, at most --size [default: 3/4 of size].")
@click.option("--val-fraction", type=click.FloatRange(0, 1), default=0.1, show_default=True, callback=_parsed_by(_finite),
              help="The last fraction of images forms the val split: 0 all train, 1 all val, in between at "
                   "least one image in each (then --num must be at least 2).")
@click.option("--layout", type=click.Choice(["voc", "coco"]), help="Disk layout [default: voc for seg, coco for det].")
def synth(task, num, size, seed, out, classes, min_size, max_size, val_fraction, layout) -> None:
    """Write the synthetic benchmark to disk in a real dataset's layout."""
    from rich.progress import Progress

    from dcnbench.data.synthetic import SynthConfig, smallest_extent, write_synthetic
    from dcnbench.errors import InvalidSetting

    if task == "seg" and layout == "coco":
        raise click.UsageError("--task seg writes the VOC segmentation layout only (--layout voc)")
    if min_size is None:
        min_size = max(size / 16, smallest_extent(SynthConfig.min_pixels))
    try:
        config = SynthConfig(size=size, num_classes=classes, min_size=min_size,
                             max_size=size * 0.75 if max_size is None else max_size)
        with _exit_130_on_interrupt(f"the images written are kept in {out}; the same command completes the dataset"), \
                Progress(transient=True) as progress:  # settings are checked before the first image
            bar = progress.add_task(f"synth {task} -> {out}", total=num)
            summary = write_synthetic(out, task, num, config, seed, val_fraction, layout,
                                      progress=lambda done: progress.update(bar, completed=done))
    except InvalidSetting as exc:
        raise _usage_error(exc) from exc
    click.echo(f"wrote {summary['train']} train + {summary['val']} val images ({summary['objects']} objects, "
               f"{summary['layout']} layout) to {out}")


@main.command()
@click.option("--params-only", is_flag=True, help="Only count parameters -> <results-dir>/table4_params.csv.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to time the networks (auto: CUDA when available).")
@click.option("--scale", type=click.FloatRange(0.01, 1.0), default=1.0, show_default=True, callback=_parsed_by(_finite),
              help="Shrink the paper's input sizes by this factor (quick runs).")
@click.option("--repeats", type=click.IntRange(2), default=15, show_default=True,
              help="Rounds per model (plain and deformable alternate): 15 narrow the ratios' 90% intervals enough "
                   "to decide most goals on a quiet 2-core machine; 3 are a smoke run.")
@click.option("--model", "models", multiple=True,
              type=click.Choice(["DeepLab@C", "DeepLab@V", "class-aware RPN", "Faster R-CNN", "R-FCN"]),
              help="Only these Table 4 rows (repeatable; default all).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="ImageNet ResNet-101 state dict (optional).")
@click.option("--threads", type=click.IntRange(1, _MAX_THREADS), help="torch CPU threads [default: torch's].")
@click.option("--results-dir", type=OutputDir(), default=str(RESULTS_DIR), show_default=True,
              help="Where table4_params.csv and table4_runtime_<device>[_scale<s>].csv go (rows there are resumed).")
def runtime(params_only, device, scale, repeats, models, weights, threads, results_dir) -> None:
    """Table 4: parameter counts and plain vs deformable runtime of the paper's ResNet-101 networks."""
    _require_checkout()
    from dcnbench.errors import InvalidSetting
    from dcnbench.runtime import main as runtime_main

    if device == "cuda" and not params_only:
        try:
            _device(device)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--device") from exc

    with _exit_130_on_interrupt():  # runtime_main says which models it kept
        try:
            runtime_main(params_only, device, scale, repeats, list(models) or None, weights, results_dir, threads)
        except InvalidSetting as exc:  # e.g. a file in --results-dir that is not a runtime CSV
            raise _usage_error(exc) from exc


@main.command("table")
@click.argument("number", type=click.Choice(["1", "2", "3", "4", "5", "7"]))
@click.option("--tier", type=click.Choice(["smoke", "cpu", "paper"]), default="cpu", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["console", "markdown", "latex", "csv"]), default="console",
              show_default=True)
@click.option("--results", type=click.Path(exists=True, dir_okay=False),
              help="Results CSV [default: results/ablate/table<N>_<tier>.csv; Table 4: a runtime CSV, with "
                   "table4_params.csv beside it, default: the paper-size results/table4_runtime_<device>.csv].")
@click.option("--figures", "with_figures", is_flag=True,
              help="Also plot the table (Tables 1-3): table<N>_<tier>.png and .pdf beside the markdown in --out.")
@click.option("--out", type=OutputDir(),
              help="Where table<N>_<tier>.md goes [default: the checkout's results/tables; with --results, beside "
                   "that CSV, so that rendering another CSV never replaces the committed tables].")
def table(number, tier, fmt, results, with_figures, out) -> None:
    """Table N of the paper beside ours (mean ± std over seeds, differences to the baseline);
    writes <out>/table<N>_<tier>.md."""
    _require_checkout()
    from pathlib import Path

    from dcnbench.report.tables import format_rendered, render_table, to_rich, write_markdown

    out = out or (Path(results).parent if results else RESULTS_DIR / "tables")
    if with_figures and number not in ("1", "2", "3"):
        raise click.BadParameter(f"Tables 1-3 have plots, Table {number} has none", param_hint="--figures")

    try:
        rendered = render_table(int(number), tier, Path(results) if results else None)
    except ValueError as exc:  # e.g. a results CSV of another table, or mixing process counts
        if results:
            raise click.BadParameter(str(exc), param_hint="--results") from exc
        raise click.ClickException(str(exc)) from exc
    path = write_markdown(rendered, Path(out))
    if fmt == "console":
        from rich.console import Console

        console = Console()
        for part in to_rich(rendered, console.width):
            console.print(part)
    else:
        click.echo(format_rendered(rendered, fmt), nl=False)
    click.echo(f"wrote {path}", err=True)
    if with_figures:
        from dcnbench.report.figures import ablation_figure

        paths = ablation_figure(int(number), tier, Path(out), csv_path=Path(results) if results else None)
        for p in paths:
            click.echo(f"wrote {p}", err=True)
        if not paths:
            click.echo(f"no plot: table {number} has no {tier}-tier results", err=True)


@main.command()
@click.option("--tier", type=click.Choice(["smoke", "cpu", "paper"]), default="cpu", show_default=True)
@click.option("--table", "tables", type=click.IntRange(1, 3), multiple=True, help="Ablation plots [default: 1, 2, 3].")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True),
              help="Trained model for Figure 5 [default: a res5a-c checkpoint under <results-dir>/checkpoints].")
@click.option("--roi-checkpoint", type=click.Path(dir_okay=False, exists=True),
              help="Trained model with deformable RoI pooling for Figure 6 [default: from Table 3's runs there].")
@click.option("--results-dir", type=click.Path(exists=True, file_okay=False),
              help="An `ablate --out` folder: table<N>_<tier>.csv and checkpoints/ [default: the checkout's "
                   "results/ablate].")
@click.option("--out", type=OutputDir(), default=str(RESULTS_DIR / "figures"), show_default=True)
def figures(tier, tables, checkpoint, roi_checkpoint, results_dir, out) -> None:
    """Figures 5 and 6 from trained checkpoints, and one plot per ablation table (PNG and PDF)."""
    _require_checkout()
    from pathlib import Path

    from dcnbench.report import figures as fg
    from dcnbench.report.tables import results_csv

    out_dir, root = Path(out), Path(results_dir) if results_dir else None
    for n in tables or (1, 2, 3):
        csv_path = results_csv(n, tier, root)
        try:
            paths = fg.ablation_figure(n, tier, out_dir, csv_path)
        except ValueError as exc:  # a malformed results CSV: tables.row_problems says what is wrong
            raise click.ClickException(str(exc)) from exc
        click.echo(f"table {n}: " + (", ".join(map(str, paths)) if paths else f"no {tier}-tier results in {csv_path}"))
    for kind, option, given, make in (("figure5", "--checkpoint", checkpoint, fg.figure5_from_checkpoint),
                                      ("figure6", "--roi-checkpoint", roi_checkpoint, fg.figure6_from_checkpoint)):
        ckpt, stale = (Path(given), []) if given else fg.default_checkpoint(kind, tier,
                                                                             root / "checkpoints" if root else None)
        for path in stale:
            click.echo(f"{kind}: skipped {path}: trained with another config than experiments/ defines now")
        if ckpt is None:
            click.echo(f"{kind}: no checkpoint found (run `dcnbench ablate` first or pass one)")
            continue
        # Named after the tier, or after the checkpoint given: a smoke run never replaces the cpu tier's.
        stem = f"{kind}_{Path(given).stem if given else tier}"
        try:
            click.echo(f"{kind}: " + ", ".join(map(str, make(ckpt, out_dir, stem=stem))))
        except (ValueError, FileNotFoundError) as exc:  # unreadable, or not a model the figure can show
            if given:
                raise click.BadParameter(str(exc), param_hint=option) from exc
            raise click.ClickException(f"{kind} from {ckpt}: {exc}") from exc


@main.command()
@click.option("--smoke/--no-smoke", default=True, show_default=True, help="Re-run the smoke tier against the reference.")
@click.option("--table", "tables", type=click.IntRange(1, 3), multiple=True, help="Smoke tables [default: the reference's].")
@click.option("--jobs", type=click.IntRange(1), help="Parallel smoke runs [default: the reference's; 1 to measure it].")
@click.option("--update-reference", is_flag=True, help="Measure the smoke reference (--seeds seeds) and exit.")
@click.option("--seeds", type=click.IntRange(3), default=3, show_default=True, help="Seeds for --update-reference.")
@click.option("--record-findings", is_flag=True, help="Record the findings' verdicts on the cpu-tier CSVs and exit.")
def check(smoke, tables, jobs, update_reference, seeds, record_findings) -> None:
    """Regression gate: smoke numbers within the reference's tolerance, committed cpu-tier CSVs
    parse and render, recorded findings still hold. Non-zero exit with a diff otherwise."""
    _require_checkout()
    from dcnbench.report import check as gate

    if update_reference:
        for p in gate.update_reference(tables or gate.SMOKE_TABLES, seeds, jobs or 1):
            click.echo(f"wrote {p}")
        return
    if record_findings:
        for f in gate.record_findings():
            verdict = {True: "holds", False: "does not hold", None: "not evaluated"}[f.holds]
            click.echo(f"{f.id}: {verdict}" + (f" ({f.measured})" if f.measured else ""))
        click.echo(f"wrote {gate.FINDINGS_PATH}")
        return
    report = gate.run_check(smoke=smoke, tables=list(tables) or None, jobs=jobs)
    click.echo(report.text())
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
