"""Operator benchmark: dcnbench's kernels against torchvision and the dense / non-deformable baselines.

Every case is timed in one process with the implementations interleaved (round r runs each
implementation once), after warm-up; the reported time is the median over rounds. Ratios compare
implementations measured in the same rounds at the same thread count. Results go to
``<out>/ops_<device>.csv``, one row per op x implementation x shape x pass x threads.

Cases (issue 3):

- deform_conv2d, 3x3, float32, offsets ~ N(0, 1.5^2) px, baseline ``F.conv2d`` of the same shape:
  res5 (1,512,38,63->512, dil 2), mid (1,256,64,64->256), small (8,64,48,48->64, dil 2),
  tiny (16,32,24,24->32, dil 2); also the modulated (mask) variant of dcnbench.
- deform_ps_roi_pool, R-FCN: (1, 7*7*21, 38, 63), 300 rois, 7x7, sampling 4, class-specific offsets;
  baseline ``torchvision.ops.ps_roi_align`` at the same samples per bin.
- deform_roi_pool: (1, 256, 38, 63), 300 rois, 7x7, sampling 4, offsets; baseline ``roi_align``.
- memory: deform_conv2d forward+backward of the small shape at batch 64, peak RSS of a fresh process.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dcnbench.runner.results import command_line, cpu_model, git_commit

CONV_SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    # name: (N, C, H, W, O, dilation); 3x3 kernel, padding = dilation, stride 1
    "res5": (1, 512, 38, 63, 512, 2),
    "mid": (1, 256, 64, 64, 256, 1),
    "small": (8, 64, 48, 48, 64, 2),
    "tiny": (16, 32, 24, 24, 32, 2),
}
MEMORY_SHAPE = ("small-b64", (64, 64, 48, 48, 64, 2))
PASSES = ("forward", "forward+backward")
NATIVE = "dcnbench-native"
NATIVE_MASKED = "dcnbench-native-modulated"
REFERENCE = "dcnbench-reference"
TORCHVISION = "torchvision"

FIELDS = [
    "op", "implementation", "shape", "shape_desc", "pass", "threads", "ms", "baseline", "ratio_to_baseline",
    "speedup_vs_torchvision", "peak_rss_mb", "repeats", "loadavg", "device", "float32_mode", "machine", "nproc", "torch",
    "torchvision", "git_commit", "date", "command",
]


@dataclass
class Case:
    op: str
    shape: str
    desc: str
    baseline: str
    impls: dict[str, Callable[[bool], Callable[[], None]]] = field(default_factory=dict)


def _positive_ints(text: str) -> list[int]:
    """``"1,2"`` -> [1, 2]; [] unless ``text`` is comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        return []
    return values if min(values) >= 1 else []


def parse_shape(spec: str) -> tuple[str, tuple[int, int, int, int, int, int]]:
    """``"name=N,C,H,W,O[,dilation]"`` -> (name, (N, C, H, W, O, dilation)); ValueError otherwise.

    A built-in name (res5, mid, small, tiny, and the memory case's small-b64) keeps its own dims: issue
    3's targets are judged by name, so a smaller shape under that name would be judged as if it were
    the built-in one."""
    name, _, dims = spec.partition("=")
    name = name.strip()
    values = _positive_ints(dims)
    if len(values) == 5:
        values.append(1)
    if not name or len(values) != 6:
        raise ValueError(f"expected NAME=N,C,H,W,O[,DIL] with positive integers, got {spec!r}")
    reserved = {**CONV_SHAPES, MEMORY_SHAPE[0]: MEMORY_SHAPE[1]}
    if name in reserved and tuple(values) != reserved[name]:
        builtin = ",".join(map(str, reserved[name]))
        raise ValueError(f"{name!r} is the built-in shape {name}={builtin}; give shape {spec!r} another name")
    return name, tuple(values)  # type: ignore[return-value]


def parse_threads(spec: str) -> list[int]:
    """``"1,2"`` -> [1, 2]; ValueError unless the entries are distinct positive integers."""
    threads = _positive_ints(spec)
    if not threads:
        raise ValueError(f"expected comma-separated positive integers, got {spec!r}")
    if len(set(threads)) != len(threads):
        raise ValueError(f"expected distinct thread counts, got {spec!r}")
    return threads


def conv_desc(dims: tuple[int, int, int, int, int, int]) -> str:
    """The ``shape_desc`` of a deform_conv2d case: ``"(N,C,H,W)->O, 3x3, dil D"``."""
    n, c, h, w, o, d = dims
    return f"({n},{c},{h},{w})->{o}, 3x3, dil {d}"


def check_device(device: str) -> str:
    """``device`` ("cpu", "cuda" or "cuda:<i>") when its dcnbench kernels can run here, else ValueError."""
    from dcnbench.ops.dispatch import backend_status

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"expected cpu, cuda or cuda:<index>, got {device!r}")
    ok, why = backend_status(_kernel_backend(device))
    if not ok:
        what = "CUDA is" if device.startswith("cuda") else "dcnbench's native CPU backend is"
        raise ValueError(f"{what} not available on this machine: {why}")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def machine_info() -> dict[str, str]:
    return {"machine": cpu_model(), "nproc": str(os.cpu_count() or 1)}


def _loadavg() -> str:
    """1-minute load average when the case finished (other processes share the CPU)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _kernel_backend(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "native"


def _timed(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor,
           backend_name: str | None = None) -> Callable[[bool], Callable[[], None]]:
    """``build(backward)`` -> a closure running ``fn(*leaves)`` (forward, or forward+backward of ``grad``)
    on fresh copies of the leaves, under ``use_backend(backend_name)`` when given."""
    from dcnbench.ops import use_backend

    def build(backward: bool) -> Callable[[], None]:
        tensors = [t.detach().clone().requires_grad_(backward) for t in leaves]

        def run() -> None:
            with use_backend(backend_name) if backend_name else _null():
                if backward:
                    for t in tensors:
                        t.grad = None
                    fn(*tensors).backward(grad)
                else:
                    with torch.no_grad():
                        fn(*tensors)
        return run
    return build


def conv_case(name: str, dims, device: str, with_reference: bool, with_torchvision: bool = True) -> Case:
    import torchvision

    from dcnbench.ops import deform_conv2d

    n, c, h, w, o, d = dims
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).to(device)
    weight = (torch.randn(o, c, 3, 3, generator=g) / (3 * c**0.5)).to(device)
    offset = (torch.randn(n, 18, h, w, generator=g) * 1.5).to(device)
    mask = torch.rand(n, 9, h, w, generator=g).to(device)
    grad = torch.randn(n, o, h, w, generator=g).to(device)
    desc = conv_desc(dims)
    backend = _kernel_backend(device)

    case = Case("deform_conv2d", name, desc, "F.conv2d")
    case.impls["F.conv2d"] = _timed(lambda xx, ww: F.conv2d(xx, ww, None, 1, d, d), [x, weight], grad)
    case.impls[NATIVE] = _timed(lambda xx, oo, ww: deform_conv2d(xx, oo, ww, None, 1, d, d), [x, offset, weight], grad,
                                backend)
    case.impls[NATIVE_MASKED] = _timed(lambda xx, oo, ww, mm: deform_conv2d(xx, oo, ww, None, 1, d, d, mm),
                                       [x, offset, weight, mask], grad, backend)
    if with_torchvision:
        case.impls[TORCHVISION] = _timed(lambda xx, oo, ww: torchvision.ops.deform_conv2d(xx, oo, ww, None, 1, d, d),
                                         [x, offset, weight], grad)
    if with_reference:
        case.impls[REFERENCE] = _timed(lambda xx, oo, ww: deform_conv2d(xx, oo, ww, None, 1, d, d), [x, offset, weight],
                                       grad, "reference")
    return case


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rfcn_rois(k: int, h: int, w: int, scale: float, g: torch.Generator) -> torch.Tensor:
    img_h, img_w = h / scale, w / scale
    x1 = torch.rand(k, generator=g) * img_w * 0.8
    y1 = torch.rand(k, generator=g) * img_h * 0.8
    bw = 32 + torch.rand(k, generator=g) * (img_w * 0.5)
    bh = 32 + torch.rand(k, generator=g) * (img_h * 0.5)
    x2 = (x1 + bw).clamp(max=img_w - 1)
    y2 = (y1 + bh).clamp(max=img_h - 1)
    return torch.stack([torch.zeros(k), x1, y1, x2, y2], dim=1)


def roi_case(position_sensitive: bool, device: str, with_reference: bool) -> Case:
    import torchvision

    from dcnbench.ops import deform_ps_roi_pool, deform_roi_pool

    k_bins, s, scale, n_rois, h, w = 7, 4, 1.0 / 16, 300, 38, 63
    g = torch.Generator().manual_seed(1)
    if position_sensitive:
        classes = 21
        c_in, n_cls, op, baseline = k_bins * k_bins * classes, classes, "deform_ps_roi_pool", "ps_roi_align"
        desc = f"(1,{c_in},{h},{w}), {n_rois} rois, 7x7, S={s}, {n_cls}-class offsets"
    else:
        c_in, n_cls, op, baseline = 256, 1, "deform_roi_pool", "roi_align"
        desc = f"(1,{c_in},{h},{w}), {n_rois} rois, 7x7, S={s}, offsets"
    x = torch.randn(1, c_in, h, w, generator=g).to(device)
    rois = _rfcn_rois(n_rois, h, w, scale, g).to(device)
    offset = (torch.randn(n_rois, 2 * n_cls, k_bins, k_bins, generator=g) * 0.5).to(device)
    c_out = c_in // (k_bins * k_bins) if position_sensitive else c_in
    grad = torch.randn(n_rois, c_out, k_bins, k_bins, generator=g).to(device)
    backend = _kernel_backend(device)
    ours = deform_ps_roi_pool if position_sensitive else deform_roi_pool
    theirs = torchvision.ops.ps_roi_align if position_sensitive else torchvision.ops.roi_align

    case = Case(op, "rfcn" if position_sensitive else "faster-rcnn", desc, baseline)
    case.impls[baseline] = _timed(lambda xx: theirs(xx, rois, k_bins, scale, s), [x], grad)
    case.impls[NATIVE] = _timed(lambda xx, oo: ours(xx, rois, oo, k_bins, scale, s, 0.1), [x, offset], grad, backend)
    if with_reference:
        case.impls[REFERENCE] = _timed(lambda xx, oo: ours(xx, rois, oo, k_bins, scale, s, 0.1), [x, offset], grad,
                                       "reference")
    return case


def time_case(case: Case, backward: bool, device: str, repeats: int, warmup: int, budget_s: float,
              on_step: Callable[[], None] | None = None) -> dict[str, tuple[float, int]]:
    """Median ms per implementation, rounds interleaved; stops early when over ``budget_s``. Round r
    starts with the (r mod n)-th of the n implementations: each runs at every place in turn, since
    the one timed right after ``F.conv2d`` came out slower (a fixed order made the modulated op's
    forward look 10% faster than the plain one's, which does less work)."""
    runs = {name: build(backward) for name, build in case.impls.items()}
    for run in runs.values():
        for _ in range(warmup):
            run()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    start = time.perf_counter()
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runs[name]
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        if on_step:
            on_step()
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: (statistics.median(ts), len(ts)) for name, ts in times.items()}


_MEMORY_SCRIPT = """
import json, sys, time, torch
import torch.nn.functional as F
from dcnbench.ops import deform_conv2d, use_backend
from dcnbench.runner.parent import exit_with_parent
exit_with_parent({parent})  # a parent killed by SIGTERM leaves no orphan running the case
torch.set_num_threads({threads})
n, c, h, w, o, d = {dims}
impl = {impl!r}
g = torch.Generator().manual_seed(0)
x = torch.randn(n, c, h, w, generator=g).requires_grad_()
weight = (torch.randn(o, c, 3, 3, generator=g) / (3 * c ** 0.5)).requires_grad_()
offset = (torch.randn(n, 18, h, w, generator=g) * 1.5).requires_grad_()
grad = torch.randn(n, o, h, w, generator=g)
def run():
    if impl == "F.conv2d":
        F.conv2d(x, weight, None, 1, d, d).backward(grad)
    elif impl == "torchvision":
        import torchvision
        torchvision.ops.deform_conv2d(x, offset, weight, None, 1, d, d).backward(grad)
    else:
        with use_backend("native"):
            deform_conv2d(x, offset, weight, None, 1, d, d).backward(grad)
if impl != "inputs-only":
    run()
    t0 = time.perf_counter(); run(); ms = (time.perf_counter() - t0) * 1e3
else:
    ms = 0.0
# VmHWM, not ru_maxrss: Linux carries the parent's maxrss into a forked child.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"ms": ms, "peak_rss_mb": int(hwm) / 1024}}))
"""


def memory_case(impl: str, threads: int, dims) -> dict[str, float]:
    """Run the batch-64 case in a fresh process; its wall time (second run) and peak RSS."""
    script = _MEMORY_SCRIPT.format(threads=threads, dims=tuple(dims), impl=impl, parent=os.getpid())
    env = dict(os.environ)
    env.pop("DCNBENCH_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory case {impl} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (columns ``FIELDS``) to ``path`` atomically: a temporary file beside it, renamed."""
    from dcnbench.runtime import write_csv

    write_csv(path, rows, FIELDS)


@contextlib.contextmanager
def _keeping_finished_rows(path: Path, rows: list[dict], console):
    """Yields ``save()``, which writes ``rows`` (``write_rows``; called after each pass). On Ctrl-C, say
    how many rows were saved and where, then re-raise."""
    saved = [0]

    def save() -> None:
        write_rows(path, rows)
        saved[0] = len(rows)

    try:
        yield save
    except KeyboardInterrupt:
        kept = f"the {saved[0]} rows measured are in {path}" if saved[0] else f"{path} was not written"
        console.print(f"interrupted: {kept}; a rerun measures every case again")
        raise


@contextlib.contextmanager
def _restoring_torch_settings():
    """The benchmark sets torch's thread count (and, on CUDA, the TF32 flags); the caller gets its own back."""
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def run_ops_benchmark(
    shapes: dict[str, tuple[int, int, int, int, int, int]] | None = None,
    threads: list[int] | None = None,
    device: str = "cpu",
    out: Path | str = "results/bench",
    repeats: int = 7,
    warmup: int = 1,
    budget_s: float = 20.0,
    with_reference: bool = False,
    with_roi: bool = True,
    with_memory: bool = True,
    tf32: bool = False,
    console=None,
) -> Path:
    """Run the benchmark and write ``<out>/ops_<device>.csv`` (``ops_cuda_tf32.csv`` with ``tf32``:
    cuDNN and cuBLAS both in TF32; else both in full float32); returns its path. The CSV holds this
    run's rows only; it is rewritten (atomically) as each case's pass finishes, so an interrupted run
    keeps what it finished, and a run interrupted before its first pass leaves the file as it was."""
    import torchvision
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    shapes = dict(CONV_SHAPES if shapes is None else shapes)
    threads = threads or [1, 2]
    check_device(device)
    if tf32 and not device.startswith("cuda"):
        raise ValueError("tf32 applies to CUDA devices only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ops_{device.split(':')[0]}{'_tf32' if tf32 else ''}.csv"
    rows: list[dict] = []
    with _restoring_torch_settings():
        meta = {**machine_info(), "device": device, "torch": torch.__version__, "torchvision": torchvision.__version__,
                "git_commit": git_commit(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": command_line()}
        if device.startswith("cuda"):
            from dcnbench.ops.cuda import set_float32_mode

            meta["machine"] = torch.cuda.get_device_name(device)
            meta["float32_mode"] = set_float32_mode(tf32)

        n_cases = len(shapes) + (2 if with_roi else 0)
        total = len(threads) * n_cases * len(PASSES) * repeats
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress, _keeping_finished_rows(path, rows, console) as save:
            task = progress.add_task("ops benchmark", total=total)
            for t in threads:
                torch.set_num_threads(t)
                cases = [conv_case(name, dims, device, with_reference) for name, dims in shapes.items()]
                if with_roi:
                    cases += [roi_case(True, device, with_reference), roi_case(False, device, with_reference)]
                for case in cases:
                    for pass_name in PASSES:
                        progress.update(task, description=f"{t} thr  {case.op} {case.shape} {pass_name}")
                        result = time_case(case, pass_name != "forward", device, repeats, warmup, budget_s,
                                           on_step=lambda: progress.advance(task))
                        base_ms = result[case.baseline][0]
                        # torchvision's own op: deform_conv2d, or the roi case's baseline (ps_)roi_align.
                        if TORCHVISION in result:
                            tv_ms = result[TORCHVISION][0]
                        else:
                            tv_ms = result[case.baseline][0] if case.op != "deform_conv2d" else None
                        load = _loadavg()
                        for impl, (ms, n) in result.items():
                            rows.append({
                                "op": case.op, "implementation": impl, "shape": case.shape, "shape_desc": case.desc,
                                "pass": pass_name, "threads": t, "ms": f"{ms:.3f}", "baseline": case.baseline,
                                "ratio_to_baseline": f"{ms / base_ms:.3f}",
                                "speedup_vs_torchvision": f"{tv_ms / ms:.2f}" if tv_ms else "",
                                "peak_rss_mb": "", "repeats": n, "loadavg": load, **meta,
                            })
                        save()
                if with_memory and not device.startswith("cuda"):
                    name, dims = MEMORY_SHAPE
                    progress.update(task, description=f"{t} thr  memory {name} (fresh processes)")
                    base_rss = memory_case("inputs-only", t, dims)["peak_rss_mb"]
                    conv = memory_case("F.conv2d", t, dims)
                    for impl, label in (("F.conv2d", "F.conv2d"), ("native", NATIVE)):
                        res = conv if impl == "F.conv2d" else memory_case(impl, t, dims)
                        rows.append({
                            "op": "deform_conv2d", "implementation": label, "shape": name,
                            "shape_desc": f"{conv_desc(dims)}; inputs alone {base_rss:.0f} MB RSS",
                            "pass": "forward+backward", "threads": t, "ms": f"{res['ms']:.3f}", "baseline": "F.conv2d",
                            "ratio_to_baseline": f"{res['ms'] / conv['ms']:.3f}", "speedup_vs_torchvision": "",
                            "peak_rss_mb": f"{res['peak_rss_mb']:.0f}", "repeats": 1, "loadavg": _loadavg(), **meta,
                        })
                    save()

    from .report import render_tables

    for table in render_tables(rows):
        console.print(table)
    return path
