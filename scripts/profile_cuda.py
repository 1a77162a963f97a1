"""Where the CUDA backend's time goes (run on a CUDA machine; results/bench/cuda_notes.md has a run).

1. Table 4's DeepLab@V twins: time per forward (queued and synced) against their GPU kernels'
   time, the host calls that take the most time, and one res5 layer's time per call
   (nn.Conv2d, DeformConv2d and its parts, torchvision's op).
2. The same twins' Python host time by function (cProfile), which torch.profiler does not show;
   host time per call of the res5 layer and its parts (its GEMM in several forms, the launch).
3. Host split of a small layer (16x32x24x24, batch-1-like sizes are launch-bound): forward alone,
   backward alone (retain_graph), forward+backward, against torchvision's op.
4. The ten largest GPU kernels of deform_conv2d and (PS) RoI pooling forward+backward, per
   iteration, from torch.profiler (full float32 in cuDNN and cuBLAS alike).
5. The cost of ``--fmad=false`` (the backend's NVRTC option, for the CPU's rounding): GPU time of
   the dcn_* kernels per forward+backward compiled with it and with NVRTC's default, alternated.
6. The deterministic backward's cost against the atomic one (those cases and three more conv
   shapes, wall and GPU time).

Usage: PYTHONPATH=. python scripts/profile_cuda.py [deeplab_v] [python] [launch] [host] [kernels] [fmad] [deterministic]
       (deterministic needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment; scripts/device_check.sh sets it)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.profiler import ProfilerActivity, profile

from dcnbench.bench.ops import _rfcn_rois
from dcnbench.ops import deform_conv2d, deform_ps_roi_pool, deform_roi_pool, use_backend
from dcnbench.ops.cuda import set_float32_mode


def per_call_us(fn, n: int = 300, *, host_only: bool = False) -> float:
    """Time of one call in us over ``n`` calls queued back to back after warm-up: until the device
    is idle again (the larger of host and GPU time), or with ``host_only`` until the last call
    returns (the host's time, when ``n`` is too small to fill the launch queue)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if not host_only:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def conv_inputs(g: torch.Generator, n: int, c: int, h: int, w: int, o: int):
    x = torch.randn(n, c, h, w, generator=g).cuda().requires_grad_()
    weight = (torch.randn(o, c, 3, 3, generator=g) / (3 * c**0.5)).cuda().requires_grad_()
    offset = (1.5 * torch.randn(n, 18, h, w, generator=g)).cuda().requires_grad_()
    return x, offset, weight, torch.randn(n, o, h, w, generator=g).cuda()


def host_split(g: torch.Generator) -> None:
    x, offset, weight, grad = conv_inputs(g, 16, 32, 24, 24, 32)

    def forward():
        with use_backend("cuda"):
            return deform_conv2d(x, offset, weight, None, 1, 2, 2)

    out = forward()
    rows = {
        "forward": forward,
        "backward alone (retain_graph)": lambda: out.backward(grad, retain_graph=True),
        "forward+backward": lambda: forward().backward(grad),
        "torchvision forward+backward": lambda: torchvision.ops.deform_conv2d(x, offset, weight, None, 1, 2, 2)
        .backward(grad),
    }
    print("host split, (16,32,24,24)->32, dil 2 (us per call):")
    for name, fn in rows.items():
        print(f"  {name:32s} {per_call_us(fn):8.1f}")


def rfcn_inputs(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """R-FCN's PS RoI pooling at Table 4's size: 7x7x21 score maps of 38x63, 300 RoIs, (C+1) + 1
    offset groups of 7x7 parts, and an output gradient."""
    rois = _rfcn_rois(300, 38, 63, 1 / 16, g).cuda()
    feats = torch.randn(1, 49 * 21, 38, 63, generator=g).cuda().requires_grad_()
    ps_offset = (0.5 * torch.randn(300, 42, 7, 7, generator=g)).cuda().requires_grad_()
    return feats, rois, ps_offset, torch.randn(300, 21, 7, 7, generator=g).cuda()


def kernel_events(fn, iterations: int = 10):
    """torch.profiler's per-kernel averages (CUDA activity) over ``iterations`` calls of ``fn``."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernel_table(g: torch.Generator) -> None:
    cases = {}
    for name, dims in {"res5 (1,512,38,63)": (1, 512, 38, 63, 512), "res5 batch 8": (8, 512, 38, 63, 512)}.items():
        x, offset, weight, grad = conv_inputs(g, *dims)
        cases[f"deform_conv2d {name}"] = (
            lambda x=x, offset=offset, weight=weight, grad=grad:
            deform_conv2d(x, offset, weight, None, 1, 2, 2).backward(grad))
        cases[f"F.conv2d {name}"] = lambda x=x, weight=weight, grad=grad: F.conv2d(x, weight, None, 1, 2, 2).backward(grad)
    feats, rois, ps_offset, ps_grad = rfcn_inputs(g)
    cases["deform_ps_roi_pool R-FCN"] = lambda: deform_ps_roi_pool(feats, rois, ps_offset, 7, 1 / 16, 4, 0.1).backward(ps_grad)
    cases["ps_roi_align R-FCN"] = lambda: torchvision.ops.ps_roi_align(feats, rois, 7, 1 / 16, 4).backward(ps_grad)
    for name, fn in cases.items():
        with use_backend("cuda"):
            wall = per_call_us(fn, 20) / 1e3
            events = kernel_events(fn)
        kernels = sorted((e for e in events if e.self_device_time_total > 0),
                         key=lambda e: -e.self_device_time_total)[:10]
        print(f"{name}: {wall:.3f} ms per forward+backward (wall)")
        for e in kernels:
            print(f"  {e.self_device_time_total / 10 / 1e3:7.3f} ms  x{e.count // 10:<2d} {e.key[:100]}")


def per_call_synced_us(fn, n: int = 50) -> float:
    """Median time of one call that starts and ends with the device idle (as Table 4 times it)."""
    times = []
    for i in range(n + 5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e6


def deeplab_v_twins(g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Table 4's DeepLab@V twins on the GPU and one preprocessed 375x500 image (360x480)."""
    from dcnbench.runtime import build_twins, preprocess, resized_hw

    twins = {name: model.cuda() for name, model in build_twins("deeplab", {}).items()}
    raw = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=g)
    return twins, preprocess(raw, resized_hw((375, 500), 360), torch.device("cuda"))


def deeplab_v_split(g: torch.Generator) -> None:
    """Table 4's DeepLab@V twins at the paper's size, in inference mode: time per forward queued
    back to back (one sync at the end: the larger of host and GPU time) and synced (as Table 4),
    the GPU kernels' time, the host calls that take the most time per forward (CPU self time),
    then one res5 layer's time per call, queued (23x30 maps)."""
    from dcnbench.ops import DeformConv2d

    twins, x = deeplab_v_twins(g)
    conv = torch.nn.Conv2d(512, 512, 3, padding=2, dilation=2, bias=False).cuda()
    layer = DeformConv2d.from_conv(conv)
    feat = torch.randn(1, 512, 23, 30, generator=g).cuda()
    offset = torch.zeros(1, 18, 23, 30, device="cuda")
    with torch.inference_mode(), use_backend("cuda"):
        for name, model in twins.items():
            forward = lambda model=model: model.forward_raw(x)  # noqa: E731
            queued, synced = per_call_us(forward, 50) / 1e3, per_call_synced_us(forward) / 1e3
            profiles = []
            for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU]):  # kernels; host calls
                with profile(activities=activities) as prof:
                    for _ in range(10):
                        forward()
                        torch.cuda.synchronize()
                profiles.append(prof.key_averages())
            gpu = sum(e.self_device_time_total for e in profiles[0]) / 10 / 1e3
            events = profiles[1]
            print(f"DeepLab@V {name}: {queued:.2f} ms per forward queued, {synced:.2f} ms synced, "
                  f"{gpu:.2f} ms of GPU kernels; host calls with the most CPU self time per forward:")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
                print(f"    {e.self_cpu_time_total / 10 / 1e3:7.3f} ms  x{e.count // 10:<4d} {e.key[:90]}")
        rows = {
            "nn.Conv2d": lambda: conv(feat),
            "DeformConv2d (offset conv + op)": lambda: layer(feat),
            "its offset conv alone": lambda: layer.offset_conv(feat),
            "deform_conv2d op (given offsets)": lambda: deform_conv2d(feat, offset, layer.weight, None, 1, 2, 2),
            "torchvision deform_conv2d (given offsets)":
                lambda: torchvision.ops.deform_conv2d(feat, offset, conv.weight, None, 1, 2, 2),
        }
        print("res5 layer (1,512,23,30)->512, dil 2, inference (us per call):")
        for name, fn in rows.items():
            print(f"  {name:42s} {per_call_us(fn):8.1f}")


def python_hotspots(g: torch.Generator, forwards: int = 20) -> None:
    """Where the DeepLab@V twins' host time goes in Python (torch.profiler sees only aten calls):
    cProfile of ``forwards`` synced inference forwards of each twin, the 15 functions with the most
    own time, in ms per forward (cProfile's own overhead inflates Python-heavy lines)."""
    import cProfile
    import pstats

    twins, x = deeplab_v_twins(g)
    with torch.inference_mode(), use_backend("cuda"):
        for name, model in twins.items():
            for _ in range(5):
                model.forward_raw(x)
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            start = time.perf_counter()
            prof.enable()
            for _ in range(forwards):
                model.forward_raw(x)
                torch.cuda.synchronize()
            prof.disable()
            wall = (time.perf_counter() - start) / forwards * 1e3
            stats = pstats.Stats(prof).stats  # {(file, line, function): (calls, ncalls, tottime, cumtime, callers)}
            print(f"DeepLab@V {name}, cProfile: {wall:.2f} ms per forward (profiled)")
            by_own = sorted(stats.items(), key=lambda item: -item[1][2])[:15]
            ops = sorted((item for item in stats.items() if "dcnbench/ops" in item[0][0]), key=lambda item: -item[1][3])
            for title, rows in (("most own time", by_own), ("dcnbench.ops, most cumulative time", ops[:10])):
                print(f"  {title}, per forward:")
                for (file, line, function), (_, calls, own, cumulative, _) in rows:
                    where = f"{file.rsplit('/', 1)[-1]}:{line}({function})"
                    print(f"    {own / forwards * 1e3:7.3f} ms own {cumulative / forwards * 1e3:7.3f} ms cum "
                          f"x{calls // forwards:<4d} {where[:90]}")


def host_us(fn, n: int = 50, repeats: int = 5) -> float:
    """Host time of one call in us: ``n`` calls queued on an idle GPU, median of ``repeats``."""
    return statistics.median(per_call_us(fn, n, host_only=True) for _ in range(repeats))


def launch_costs(g: torch.Generator) -> None:
    """Host time per call (us) of DeepLab@V's res5 layer (1,512,23,30)->512, dilation 2, and of its
    parts, in inference mode: the layer's GEMM (512x4608 @ 4608x690) in the forms torch offers,
    the im2col launch through cupy, the op given offsets, the modules, against nn.Conv2d."""
    from dcnbench.ops import DeformConv2d
    from dcnbench.ops import cuda as backend

    conv = torch.nn.Conv2d(512, 512, 3, padding=2, dilation=2, bias=False).cuda()
    layer = DeformConv2d.from_conv(conv)
    feat = torch.randn(1, 512, 23, 30, generator=g).cuda()
    offset = torch.zeros(1, 18, 23, 30, device="cuda")
    w = layer.weight.reshape(512, 4608)
    columns = torch.randn(1, 1, 4608, 690, generator=g).cuda()
    out = torch.empty(1, 1, 512, 690, device="cuda")
    geometry = backend._conv_geometry(feat, offset, layer.weight, (1, 1), (2, 2), (2, 2))
    rows = {
        "GEMM torch.matmul (1,O,K)@(1,1,K,L), out= (as now)":
            lambda: torch.matmul(w[None], columns, out=out),
        "GEMM torch.mm, out=": lambda: torch.mm(w, columns[0, 0], out=out[0, 0]),
        "GEMM torch.mm": lambda: torch.mm(w, columns[0, 0]),
        "GEMM torch.bmm, out=": lambda: torch.bmm(w[None], columns[0], out=out[0]),
        "im2col launch (cupy)": lambda: backend._im2col(backend._cupy_launch, geometry, feat, offset, None),
        "deform_conv2d op (given offsets)": lambda: deform_conv2d(feat, offset, layer.weight, None, 1, 2, 2),
        "DeformConv2d (offset conv + op)": lambda: layer(feat),
        "nn.Conv2d": lambda: conv(feat),
        "torchvision deform_conv2d (given offsets)":
            lambda: torchvision.ops.deform_conv2d(feat, offset, conv.weight, None, 1, 2, 2),
    }
    print("host time per call (us, queued on an idle GPU), res5 layer (1,512,23,30)->512, dil 2, inference:")
    with torch.inference_mode(), use_backend("cuda"):
        for name, fn in rows.items():
            print(f"  {name:52s} {host_us(fn):8.1f}")


def conv_backward(g: torch.Generator, n: int, c: int, h: int, w: int, o: int, dilation: int = 2):
    """A forward+backward call of deform_conv2d, 3x3, on (n, c, h, w) -> o channels."""
    x, offset, weight, grad = conv_inputs(g, n, c, h, w, o)
    return lambda: deform_conv2d(x, offset, weight, None, 1, dilation, dilation).backward(grad)


def backward_cases(g: torch.Generator) -> dict:
    """Forward+backward of res5 at batch 8 (deform_conv2d) and of R-FCN's PS RoI pooling (300 RoIs)."""
    feats, rois, ps_offset, ps_grad = rfcn_inputs(g)
    return {
        "deform_conv2d res5 batch 8": conv_backward(g, 8, 512, 38, 63, 512),
        "deform_ps_roi_pool R-FCN":
            lambda: deform_ps_roi_pool(feats, rois, ps_offset, 7, 1 / 16, 4, 0.1).backward(ps_grad),
    }


def deterministic_cost(g: torch.Generator) -> None:
    """The deterministic backward (no float atomics: sorted scatter-adds) against the atomic one:
    ms per forward+backward, wall (synced) and GPU time of every kernel, alternated twice. Needs
    CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment (cuBLAS's deterministic mode)."""
    if not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        print("deterministic: skipped (cuBLAS's deterministic mode needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set "
              "before Python starts)")
        return
    cases = {**backward_cases(g), "deform_conv2d res5 batch 1": conv_backward(g, 1, 512, 38, 63, 512),
             "deform_conv2d mid batch 8": conv_backward(g, 8, 256, 64, 64, 256, 1),
             "deform_conv2d small batch 64": conv_backward(g, 64, 64, 48, 48, 64)}
    print("forward+backward (ms, wall / GPU kernels), atomic vs deterministic backward:")
    try:
        for deterministic in (False, True, False, True):
            torch.use_deterministic_algorithms(deterministic)
            for name, fn in cases.items():
                with use_backend("cuda"):
                    wall = per_call_us(fn, 20) / 1e3
                    gpu = sum(e.self_device_time_total for e in kernel_events(fn)) / 10 / 1e3
                mode = "deterministic" if deterministic else "atomic"
                print(f"  {mode:13s} {name:28s} {wall:7.3f} / {gpu:7.3f}")
    finally:
        torch.use_deterministic_algorithms(False)


def fmad_cost(g: torch.Generator) -> None:
    """GPU time of the dcn_* kernels (ms per forward+backward, torch.profiler) of res5 at batch 8
    and of R-FCN's PS RoI pooling, with the kernels compiled with --fmad=false (as the backend
    compiles them) and with --fmad=true, twice each in alternation."""
    from dcnbench.ops import cuda as backend

    strict = backend.nvrtc_options
    cases = backward_cases(g)
    print("dcn_* kernels' GPU time per forward+backward (ms), by NVRTC's --fmad:")
    try:
        for fmad in ("false", "true", "false", "true"):
            backend.nvrtc_options = lambda *args, fmad=fmad: tuple(
                o for o in strict(*args) if not o.startswith("--fmad")) + (f"--fmad={fmad}",)
            backend._module.cache_clear()
            backend._function.cache_clear()
            for name, fn in cases.items():
                with use_backend("cuda"):
                    fn()  # compiles (or loads cupy's cached build) and warms up
                    torch.cuda.synchronize()
                    ms = sum(e.self_device_time_total for e in kernel_events(fn) if "dcn_" in e.key) / 10 / 1e3
                print(f"  --fmad={fmad:5s} {name:28s} {ms:7.3f}")
    finally:
        backend.nvrtc_options = strict
        backend._module.cache_clear()
        backend._function.cache_clear()


SECTIONS = {"deeplab_v": deeplab_v_split, "python": python_hotspots, "launch": launch_costs, "host": host_split,
            "kernels": kernel_table, "fmad": fmad_cost, "deterministic": deterministic_cost}


def main(sections: list[str]) -> None:
    """Run the named sections (all when none is named)."""
    set_float32_mode(False)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    g = torch.Generator().manual_seed(0)
    for name in sections or SECTIONS:
        SECTIONS[name](g)


if __name__ == "__main__":
    main(sys.argv[1:])
