"""Table 4: parameter counts and runtime of the paper's ResNet-101 networks, plain vs deformable.

- :func:`param_rows` counts the ten Table 4 models (DeepLab@C, DeepLab@V, class-aware RPN,
  Faster R-CNN, R-FCN; plain and deformable; VOC's 21 classes = 20 + background).
- :func:`run_runtime` times each model's "net forward" (the network, proposal generation included)
  and full "runtime" (resize and normalisation of a raw uint8 image + net forward + post-processing:
  softmax / arg-max for DeepLab, box decoding and per-class NMS for the detectors) at the paper's
  input sizes times ``scale``, median over ``repeats`` after one warm-up, and appends one CSV row per
  model and variant as soon as it is measured; rows already in the file are skipped (resume). Paper
  sizes go to ``table4_runtime_<device>.csv``, a scaled run to its own ``..._scale<s>.csv``
  (:func:`runtime_csv`), so quick runs never mix with the paper-size table.

"deformable" is Table 4's "Ours": deformable conv in res5a-c, plus deformable (PS) RoI pooling for
Faster R-CNN and R-FCN (the paper's parameter deltas include the RoI-pooling offset layers). The
plain and deformable twins share every weight (the deformable one loads the plain one's state dict;
offsets are zero-initialised), so both see identical activations and post-process the same boxes.
Weights are random unless ``weights`` names an ImageNet ResNet-101 state dict; to give NMS a
workload that does not depend on untrained scores, detectors post-process with score threshold 0
(every proposal × class pair enters per-class NMS; 6000 pre-NMS candidates for the class-aware RPN).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

from dcnbench.models import build_model, count_parameters, load_backbone_weights
from dcnbench.ops import DeformConv2d, backend_for

PAPER_TABLE4 = Path(__file__).resolve().parents[1] / "results" / "paper" / "table4.csv"
VARIANTS = ("plain", "deformable")
RUNTIME_COLUMNS = [
    "model", "variant", "device", "net_forward_s", "runtime_s", "repeats", "scale", "input_hw", "raw_hw",
    "proposals", "params", "net_forward_min_s", "runtime_min_s", "net_forward_all_s", "runtime_all_s", "loadavg_1m", "backend", "threads", "weights_sha256", "float32_mode", "machine", "torch",
    "git_commit", "date", "command",
]
PARAMS_COLUMNS = ["model", "variant", "params", "torch", "git_commit", "date", "command"]
MIN_ROUNDS_FOR_INTERVAL = 5  # fewer rounds: ratios of medians only, no interval and no verdict
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Table4Model:
    name: str  # the paper's row label
    task: str
    raw_hw: tuple[int, int]  # the raw image: Cityscapes 1024×2048, a typical VOC image 375×500
    shorter_side: int  # resized so its shorter side is this many pixels (paper section 4.1)


TABLE4_MODELS = (
    Table4Model("DeepLab@C", "deeplab", (1024, 2048), 1024),
    Table4Model("DeepLab@V", "deeplab", (375, 500), 360),
    Table4Model("class-aware RPN", "rpn", (375, 500), 600),
    Table4Model("Faster R-CNN", "faster_rcnn", (375, 500), 600),
    Table4Model("R-FCN", "rfcn", (375, 500), 600),
)
NUM_CLASSES = 20  # VOC: 20 classes + background = 21


def table4_config(task: str, variant: str, num_classes: int = NUM_CLASSES, **extra) -> dict:
    """The build_model config of a Table 4 network (ResNet-101, output stride 16, dilation 2)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    deformable = variant == "deformable"
    cfg = {"task": task, "backbone": "resnet101", "num_classes": num_classes, "placement": "res5a-c" if deformable else "none"}
    if task in ("faster_rcnn", "rfcn"):
        cfg["deformable_roi_pool"] = deformable
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------------------
# The paper's numbers.

def read_paper_table4(path: Path = PAPER_TABLE4) -> dict[tuple[str, str], dict[str, float]]:
    """{(model, variant): {"params_M", "net_forward_s", "runtime_s"}} from results/paper/table4.csv."""
    columns = {"# params (M)": "params_M", "net. forward (sec)": "net_forward_s", "runtime (sec)": "runtime_s"}
    out: dict[tuple[str, str], dict[str, float]] = {}
    with Path(path).open(newline="") as f:
        for rec in csv.DictReader(f):
            row = rec["row"]
            key = (row.removesuffix(", Ours"), "deformable" if row.endswith(", Ours") else "plain")
            out.setdefault(key, {})[columns[rec["column"]]] = float(rec["value"])
    return out


# ---------------------------------------------------------------------------------------------
# Parameter counts.

def param_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by part: backbone body, reduction conv, RPN, task head, offset layers (all offset
    convs / fcs, wherever they sit), and the total."""
    parts = {"backbone": 0, "reduce": 0, "rpn": 0, "head": 0, "offsets": 0}
    tensors = list(model.named_parameters())
    tensors += [(f"{name}.{attr}", getattr(m, attr)) for name, m in model.named_modules()
                if isinstance(m, FrozenBatchNorm2d) for attr in ("weight", "bias")]
    for name, t in tensors:
        if "offset" in name:
            part = "offsets"
        elif name.startswith("backbone.reduce."):
            part = "reduce"
        elif name.startswith("backbone."):
            part = "backbone"
        elif name.startswith("rpn.") and type(model).__name__ != "ClassAwareRPN":
            part = "rpn"
        else:
            part = "head"
        parts[part] += t.numel()
    parts["total"] = sum(parts.values())
    return parts


def param_rows(num_classes: int = NUM_CLASSES) -> list[dict]:
    """One row per Table 4 model and variant: model, variant, params, and the breakdown."""
    rows, cache = [], {}
    for spec in TABLE4_MODELS:
        for variant in VARIANTS:
            key = (spec.task, variant)
            if key not in cache:  # DeepLab@C and DeepLab@V are the same network
                with torch.device("meta"):  # shapes only: no memory, no initialisation
                    model = build_model(table4_config(spec.task, variant, num_classes))
                breakdown = param_breakdown(model)
                if breakdown["total"] != count_parameters(model):
                    raise AssertionError("parameter breakdown does not add up")
                cache[key] = breakdown
                del model
            rows.append({"model": spec.name, "variant": variant, "params": cache[key]["total"], **cache[key]})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Write ``rows`` (only ``columns``) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Runtime.

def resized_hw(raw_hw: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    h, w = raw_hw
    s = shorter_side / min(h, w)
    return round(h * s), round(w * s)


def preprocess(raw: torch.Tensor, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Raw uint8 (3, H0, W0) image -> normalised float (1, 3, h, w) on ``device`` (the "resize")."""
    x = raw.to(device, non_blocking=True).float().div_(255).unsqueeze(0)
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(model: torch.nn.Module, raw: torch.Tensor, hw: tuple[int, int], device: torch.device) -> tuple[float, float]:
    """(net forward, full runtime) of one image, in seconds."""
    _sync(device)
    t0 = time.perf_counter()
    x = preprocess(raw, hw, device)
    _sync(device)
    t1 = time.perf_counter()
    out = model.forward_raw(x)
    _sync(device)
    t2 = time.perf_counter()
    model.postprocess(out)
    _sync(device)
    t3 = time.perf_counter()
    return t2 - t1, t3 - t0


def time_models(models: dict[str, torch.nn.Module], raw: torch.Tensor, hw: tuple[int, int], device: torch.device,
                repeats: int, warmup: int = 1, on_round: Callable[[], None] | None = None,
                ) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (net forward times, full runtimes)}: ``warmup`` untimed runs of each model, then
    ``repeats`` rounds that run every model once in turn, so that the variants share whatever
    else the machine is doing; odd rounds run them in reverse order, so that neither always
    runs first. ``on_round`` is called after each round, warm-up included (progress)."""
    times = {name: ([], []) for name in models}
    order = list(models.items())
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in order[::-1] if i % 2 else order:
                net, total = _time_once(model, raw, hw, device)
                if i >= warmup:
                    times[name][0].append(net)
                    times[name][1].append(total)
            if on_round is not None:
                on_round()
    return times


def _seconds(t: float) -> str:
    """A time in seconds for the CSV, to the microsecond: a 10 ms GPU forward keeps 4 significant digits."""
    return f"{t:.6f}"


_ROW_KEY_COLUMNS = ("model", "variant", "device", "scale", "repeats", "backend")


def _row_key(row: dict) -> tuple:
    """What makes two runs the same measurement (resume): model, variant, device, scale, rounds, backend,
    threads and the weights file's SHA-256 (empty: the seed-0 initialisation)."""
    return (row["model"], row["variant"], row["device"], f"{float(row['scale']):g}", str(row["repeats"]),
            row["backend"], str(row.get("threads", "")), row.get("weights_sha256") or "")


def _store_rows(path: Path, new_rows: list[dict]) -> None:
    """Put ``new_rows`` into runtime CSV ``path``, replacing rows of the same key and keeping every
    other row: re-read and rewritten under the folder's lock, so runs into one folder at once keep
    each other's rows (ablate's results do the same)."""
    from dcnbench.runner.results import folder_lock

    keys = {_row_key(r) for r in new_rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):
        rows = [r for r in _measured_rows(path) if _row_key(r) not in keys]
        extra = [c for r in rows for c in r if c not in RUNTIME_COLUMNS and c is not None]  # a user's own columns
        write_csv(path, rows + new_rows, RUNTIME_COLUMNS + list(dict.fromkeys(extra)))


def build_twins(task: str, extra: dict, weights: str | None = None) -> dict[str, torch.nn.Module]:
    """{"plain": ..., "deformable": ...} Table 4 networks sharing every weight (offsets zero)."""
    torch.manual_seed(0)
    plain = build_model(table4_config(task, "plain", **extra))
    if weights:
        load_backbone_weights(plain, weights)
    deformable = build_model(table4_config(task, "deformable", **extra))
    missing, unexpected = deformable.load_state_dict(plain.state_dict(), strict=False)
    if unexpected or any("offset" not in k for k in missing):
        raise RuntimeError(f"plain/deformable twins differ beyond offsets: missing {missing}, unexpected {unexpected}")
    return {"plain": plain.eval(), "deformable": deformable.eval()}


def kernel_weight_order(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its deformable convs' weights in the order their kernels read: channels-last on
    the CPU (else the kernels copy each 512-channel res5 weight, 9.4 MB, per call), standard on CUDA.
    A layout, as a deployment would store them; values unchanged. The offset convs keep theirs (a
    channels-last one would turn F.conv2d's output, the offsets, channels-last)."""
    for module in model.modules():
        if isinstance(module, DeformConv2d) and module.weight.device.type == "cpu":
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def runtime_csv(results_dir: Path, device: str, scale: float) -> Path:
    """``table4_runtime_<device>.csv`` at the paper's sizes, ``table4_runtime_<device>_scale<s>.csv`` otherwise."""
    return Path(results_dir) / f"table4_runtime_{device}{'' if scale == 1 else f'_scale{scale:g}'}.csv"


def run_runtime(
    out_csv: Path, device: str = "cpu", scale: float = 1.0, repeats: int = 3, models: list[str] | None = None,
    weights: str | None = None, proposals: int = 300, log: Callable[[str], None] = print,
    on_round: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure every Table 4 model whose rows are not yet in ``out_csv`` (same device, scale,
    repeats, backend, thread count and weights); returns this configuration's rows, found and new. Plain and deformable
    are timed in alternation and their two rows appended (atomically) as soon as they are done.
    ``on_round(model)`` is called after each of a model's ``1 + repeats`` rounds (progress)."""
    from dcnbench.runner.results import command_line, git_commit, machine
    from dcnbench.runner.train import file_sha256

    commit = git_commit()  # the code that runs: the tree may change during an hours-long run
    weights_digest = file_sha256(weights) if weights else ""
    dev = torch.device(device)
    backend = backend_for(torch.empty(0, device=dev))
    float32_mode, machine_name = "", machine()
    if dev.type == "cuda":  # the paper's K40 has no TF32: cuDNN and cuBLAS both in full float32
        from dcnbench.ops.cuda import set_float32_mode

        float32_mode, machine_name = set_float32_mode(False), torch.cuda.get_device_name(dev)
    specs = [s for s in TABLE4_MODELS if models is None or s.name in models]
    if models is not None and len(specs) != len(set(models)):
        raise ValueError(f"unknown model in {models}; known: {[s.name for s in TABLE4_MODELS]}")
    rows = _measured_rows(out_csv)
    done = {_row_key(r): r for r in rows}
    result = []
    for spec in specs:
        keys = {v: _row_key({"model": spec.name, "variant": v, "device": dev.type, "scale": scale, "repeats": repeats,
                             "backend": backend, "threads": torch.get_num_threads(),
                             "weights_sha256": weights_digest}) for v in VARIANTS}
        if all(k in done for k in keys.values()):
            log(f"{spec.name}: already measured, skipped")
            result += [done[k] for k in keys.values()]
            continue
        raw_hw = tuple(max(1, round(v * scale)) for v in spec.raw_hw) if spec.name == "DeepLab@C" else spec.raw_hw
        hw = resized_hw(raw_hw, max(1, round(spec.shorter_side * scale)))
        extra = {} if spec.task == "deeplab" else {"score_thresh": 0.0}
        if spec.task in ("faster_rcnn", "rfcn"):  # the class-aware RPN makes no proposals
            extra["rpn_post_nms_top_n"] = (2000, proposals)
        twins = {name: kernel_weight_order(m.to(dev)) for name, m in build_twins(spec.task, extra, weights).items()}
        raw = torch.randint(0, 256, (3, *raw_hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        log(f"{spec.name}: {raw_hw[0]}x{raw_hw[1]} -> {hw[0]}x{hw[1]}, plain and deformable alternating, "
            f"{repeats} repeats on {dev} ({backend}, {torch.get_num_threads()} threads)")
        load_before = os.getloadavg()[0]
        times = time_models(twins, raw, hw, dev, repeats,
                            on_round=None if on_round is None else lambda name=spec.name: on_round(name))
        load_after = os.getloadavg()[0]
        for variant in VARIANTS:
            net, total = times[variant]
            row = {
                "model": spec.name, "variant": variant, "device": dev.type,
                "net_forward_s": _seconds(statistics.median(net)), "runtime_s": _seconds(statistics.median(total)),
                "repeats": repeats, "scale": f"{float(scale):g}", "input_hw": f"{hw[0]}x{hw[1]}",
                "raw_hw": f"{raw_hw[0]}x{raw_hw[1]}", "proposals": proposals if spec.task in ("faster_rcnn", "rfcn") else "",
                "params": count_parameters(twins[variant]),
                "net_forward_min_s": _seconds(min(net)), "runtime_min_s": _seconds(min(total)),
                "net_forward_all_s": " ".join(map(_seconds, net)), "runtime_all_s": " ".join(map(_seconds, total)),
                "loadavg_1m": f"{load_before:.2f}/{load_after:.2f}",
                "backend": backend, "threads": torch.get_num_threads(), "weights_sha256": weights_digest,
                "float32_mode": float32_mode, "machine": machine_name,
                "torch": torch.__version__,
                "git_commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": command_line(),
            }
            log(f"  {variant}: net forward {row['net_forward_s']} s, runtime {row['runtime_s']} s")
            result.append(row)
        _store_rows(out_csv, result[-len(VARIANTS):])
        del twins
    return result


def _measured_rows(path: Path) -> list[dict]:
    """The rows already in runtime CSV ``path`` (none when it does not exist); InvalidSetting naming
    --results-dir when the file there is not a runtime CSV (unreadable, or without its key columns)."""
    from dcnbench.errors import InvalidSetting
    from dcnbench.runner.results import UnreadableCSV, read_rows

    try:
        rows = read_rows(path)
    except UnreadableCSV as exc:
        raise InvalidSetting(f"{exc}, where the runtime CSV goes: move it or choose another folder",
                             "results_dir") from exc
    lacking = [c for c in _ROW_KEY_COLUMNS if rows and c not in rows[0]]
    if lacking:
        raise InvalidSetting(f"{path} is not a runtime CSV (no column {', '.join(lacking)}): move it or choose "
                             "another folder", "results_dir")
    for line, row in enumerate(rows, start=2):
        try:
            _row_key(row)
        except (TypeError, ValueError) as exc:  # a short line (None), a scale that is not a number
            raise InvalidSetting(f"{path} line {line} is not a runtime row ({exc}): fix or move it, or choose "
                                 "another folder", "results_dir") from exc
    return rows


def paired_ratio(plain_times: list[float], deformable_times: list[float], level: float = 0.90,
                 resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median of the per-round deformable/plain ratios, and a percentile
    bootstrap interval of that median at ``level``. Plain and deformable run in alternation, so the
    two times of a round share the machine's state: their ratio cancels slow drifts of the host."""
    if len(plain_times) != len(deformable_times) or not plain_times:
        raise ValueError(f"need equally many plain and deformable times, got {len(plain_times)} and "
                         f"{len(deformable_times)}")
    ratios = [d / p for p, d in zip(plain_times, deformable_times)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - level) / 2
    return (statistics.median(ratios), medians[int(tail * (resamples - 1))],
            medians[int(round((1 - tail) * (resamples - 1)))])


def verdict(low: float, high: float, paper: float) -> str:
    """The goal "our overhead ratio at or below the paper's" for an interval of our ratio."""
    if high <= paper:
        return "met"
    return "not met" if low > paper else "unresolved"


def overhead_rows(rows: list[dict], paper: dict | None = None) -> list[dict]:
    """Per model: our plain/deformable times and deformable/plain ratios beside the paper's; with
    every round's times in the rows (``*_all_s``, at least ``MIN_ROUNDS_FOR_INTERVAL`` rounds), also
    the paired ratio and its 90% interval, and, at the paper's sizes (``scale`` 1), the verdict
    against the paper."""
    paper = read_paper_table4() if paper is None else paper
    by = {(r["model"], r["variant"]): r for r in rows}
    out = []
    for spec in TABLE4_MODELS:
        p, d = by.get((spec.name, "plain")), by.get((spec.name, "deformable"))
        if p is None or d is None:
            continue
        pp, pd = paper.get((spec.name, "plain"), {}), paper.get((spec.name, "deformable"), {})
        rec = {"model": spec.name}
        paper_sizes = all(float(r.get("scale") or 1) == 1 for r in (p, d))
        for col in ("net_forward_s", "runtime_s"):
            ours = float(d[col]) / float(p[col])
            theirs = pd[col] / pp[col] if col in pd and col in pp else float("nan")
            rec |= {f"plain_{col}": float(p[col]), f"deformable_{col}": float(d[col]),
                    f"ratio_{col}": ours, f"paper_ratio_{col}": theirs}
            all_col = col.replace("_s", "_all_s")
            plain_times, deformable_times = ([float(t) for t in r.get(all_col, "").split()] for r in (p, d))
            if min(len(plain_times), len(deformable_times)) >= MIN_ROUNDS_FOR_INTERVAL:
                median, low, high = paired_ratio(plain_times, deformable_times)
                rec |= {f"paired_ratio_{col}": median, f"paired_low_{col}": low, f"paired_high_{col}": high,
                        f"verdict_{col}": verdict(low, high, theirs) if theirs == theirs and paper_sizes else ""}
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# The `dcnbench runtime` command's body.

def check_weights(weights: str) -> None:
    """A usage error naming ``--weights`` unless the file loads into the Table 4 ResNet-101 (before any timing)."""
    import click

    try:
        load_backbone_weights(build_model(table4_config("deeplab", "plain")), weights)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--weights") from exc


@contextlib.contextmanager
def _saying_what_is_kept(out_csv: Path):
    """Ctrl-C: say that the models measured so far are in ``out_csv`` and that a rerun resumes, then re-raise."""
    try:
        yield
    except KeyboardInterrupt:
        kept = f"the models measured so far are in {out_csv}" if out_csv.is_file() else f"{out_csv} was not written"
        print(f"\ninterrupted: {kept}; the same command resumes with the others", file=sys.stderr)
        raise


def _ratio(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def main(params_only: bool, device: str, scale: float, repeats: int, models: list[str] | None, weights: str | None,
         results_dir: str, threads: int | None, proposals: int = 300) -> None:
    """Print (and write) Table 4: parameter counts, or runtimes with overhead ratios."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    out_dir = Path(results_dir)
    paper = read_paper_table4()
    if params_only:
        from dcnbench.runner.results import command_line, git_commit

        stamp = {"torch": torch.__version__, "git_commit": git_commit(),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command_line()}
        rows = [{**r, **stamp} for r in param_rows()]
        write_csv(out_dir / "table4_params.csv", rows, PARAMS_COLUMNS)
        table = Table(title="Table 4 parameters (ResNet-101, 21 classes): ours vs paper")
        for col in ("model", "variant", "ours (M)", "paper (M)", "backbone", "reduce", "rpn", "head", "offsets"):
            table.add_column(col, justify="left" if col in ("model", "variant") else "right")
        for r in rows:
            theirs = paper.get((r["model"], r["variant"]), {}).get("params_M")
            table.add_row(r["model"], r["variant"], f"{r['params'] / 1e6:.2f}", "" if theirs is None else f"{theirs:.1f}",
                          *(f"{r[k] / 1e6:.3f}" for k in ("backbone", "reduce", "rpn", "head", "offsets")))
        console.print(table)
        console.print(f"wrote {out_dir / 'table4_params.csv'}")
        return
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if weights:
        check_weights(weights)
    if threads:
        torch.set_num_threads(threads)
    out_csv = runtime_csv(out_dir, device, scale)
    with _saying_what_is_kept(out_csv), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                              TimeElapsedColumn(), console=console, transient=True) as progress:
        bars: dict[str, TaskID] = {}

        def on_round(model: str) -> None:  # warm-up + repeats rounds of plain and deformable
            if model not in bars:
                bars[model] = progress.add_task(f"{model} rounds", total=1 + repeats)
            progress.advance(bars[model])

        rows = run_runtime(out_csv, device, scale, repeats, models, weights, proposals, log=console.print,
                           on_round=on_round)
    table = Table(title=f"Table 4 runtime on {device} (scale {scale:g}, median of {repeats}): deformable / plain")
    for col in ("model", "plain net (s)", "deform net (s)", "ratio net", "paired ratio net [90%]", "paper", "goal net",
                "ratio runtime", "paired ratio runtime [90%]", "paper ", "goal runtime"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in overhead_rows(rows, paper):
        cells = [r["model"], f"{r['plain_net_forward_s']:.3f}", f"{r['deformable_net_forward_s']:.3f}"]
        for col in ("net_forward_s", "runtime_s"):
            paired = (f"{r[f'paired_ratio_{col}']:.3f} [{r[f'paired_low_{col}']:.3f}, {r[f'paired_high_{col}']:.3f}]"
                      if f"paired_ratio_{col}" in r else "n/a")
            cells += [_ratio(r[f"ratio_{col}"]), paired, _ratio(r[f"paper_ratio_{col}"]), r.get(f"verdict_{col}", "")]
        table.add_row(*cells)
    console.print(table)
    console.print(f"wrote {out_csv}; times are medians; a paired ratio is the median of the rounds' "
                  "deformable/plain ratios (the two run in alternation), with a 90% bootstrap interval; goal: our "
                  "ratio at or below the paper's (met / not met: the whole interval on one side; else unresolved); "
                  f"intervals need {MIN_ROUNDS_FOR_INTERVAL} rounds or more, goals the paper's sizes (scale 1); "
                  "paper ratios: Intel E5-2650 v2 + Nvidia K40")
