"""Native C++ CPU kernels (``dcnbench/csrc/dcn_cpu.cpp``), compiled on first use and cached.

The first call of :func:`status` (made by the dispatch before the first native op) compiles the
extension with the system C++ compiler through ``torch.utils.cpp_extension.load`` into
``~/.cache/dcnbench/native/<key>`` (``$DCNBENCH_CACHE_DIR`` or ``$XDG_CACHE_HOME`` move it), where
``<key>`` hashes the sources, the shared ``kernels/dcn_math.h``, the torch version, the compiler
flags and the CPU's instruction-set flags; later processes load the cached build in about a second.
The build compiles copies of the sources kept in ``<key>/src``, so every checkout of the same code
(clones side by side, an A/B) shares one build.
Without a compiler (or with ``DCNBENCH_NO_NATIVE=1``) :func:`status` reports the backend unavailable
and the dispatch falls back to the pure-PyTorch reference with a one-line warning.

Memory: every thread that runs the deformable-convolution kernels keeps its scratch buffers (the
sample's channels-last copy, column tiles, sampling points, the packed weight; each grown to the
largest request up to 64 MB, e.g. ~13 MB of columns for a 512-channel 23×30 layer) for the next
call, until the thread exits. Buffers are reused, never their contents: the weight is packed anew
in every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

_CSRC = Path(__file__).resolve().parents[1] / "csrc"
_SOURCES = ("dcn_cpu.cpp",)
_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None
_built: str = ""  # status line of the loaded build


def _kernels_dir() -> Path | None:
    """The directory holding ``dcn_math.h`` (the repository's ``kernels/``, or a packaged copy)."""
    for candidate in (Path(__file__).resolve().parents[2] / "kernels", Path(__file__).resolve().parents[1] / "kernels"):
        if (candidate / "dcn_math.h").is_file():
            return candidate
    return None


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (part of the cache key, since we compile for the host CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _cache_root() -> Path:
    if os.environ.get("DCNBENCH_CACHE_DIR"):
        return Path(os.environ["DCNBENCH_CACHE_DIR"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dcnbench" / "native"


def _arch_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        # AVX2/AVX-512 gathers are slow (microcode-mitigated) on current Intel CPUs; the RoI
        # kernels' unrolled scalar loads are faster. GCC-only flag: the build retries without it.
        return ["-march=native", "-mtune-ctrl=^use_gather_2parts,^use_gather_4parts,^use_gather"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def _not_cuda_home_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


@contextlib.contextmanager
def _without_cuda_home_notice():
    """Drop the "No CUDA runtime is found, using CUDA_HOME=..." warning ``torch.utils.cpp_extension``
    logs when imported on a machine with a CUDA toolkit but no GPU (these kernels need no CUDA); its
    other messages pass, and build failures are raised as before."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(_not_cuda_home_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_cuda_home_notice)


def _copy_sources(folder: Path, files: list[Path]) -> list[Path]:
    """``files`` copied into ``folder`` (each written only when missing or different, atomically):
    the build reads them there, so every checkout of the same sources shares one build (the build
    file names its sources by path, and a build from another path would be redone)."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in files:
        copy, data = folder / source.name, source.read_bytes()
        if not copy.is_file() or copy.read_bytes() != data:
            partial = folder / f".{source.name}.{os.getpid()}.tmp"
            partial.write_bytes(data)
            os.replace(partial, copy)
        copies.append(copy)
    return copies


def _try_build(kernels: Path, arch: list[str]) -> ModuleType:
    with _without_cuda_home_notice():
        from torch.utils import cpp_extension

    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", *arch]
    ldflags = ["-fopenmp"]
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((_CSRC / name).read_bytes())
    digest.update((kernels / "dcn_math.h").read_bytes())
    digest.update(" ".join([torch.__version__, *cflags, *ldflags, _cpu_flags(), str(_compiler())]).encode())
    key = digest.hexdigest()[:16]
    build_dir = _cache_root() / key
    sources = _copy_sources(build_dir / "src", [_CSRC / name for name in _SOURCES] + [kernels / "dcn_math.h"])
    return cpp_extension.load(
        name=f"dcnbench_native_{key}",
        sources=[str(p) for p in sources if p.suffix == ".cpp"],
        extra_include_paths=[str(build_dir / "src")],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        verbose=False,
    )


def _build() -> None:
    global _module, _failure, _built
    kernels = _kernels_dir()
    if kernels is None:
        _failure = "kernels/dcn_math.h not found next to the package"
        return
    if _compiler() is None:
        _failure = f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)"
        return
    errors = []
    arch_flags = _arch_flags()
    attempts = [arch_flags, arch_flags[:1], []]
    for arch in [a for k, a in enumerate(attempts) if a not in attempts[:k]]:
        try:
            _module = _try_build(kernels, arch)
            packed = ", MKL packed GEMM" if _module.packed_gemm() else ""
            _built = f"C++ CPU kernels ({' '.join(['-O3', *arch])}{packed}, cached under {_cache_root()})"
            return
        except Exception as exc:  # compiler missing/broken, ninja missing, compile error
            lines = str(exc).strip().splitlines()
            detail = next((ln for ln in lines if "error" in ln.lower() and "Error building" not in ln), "")
            head = lines[0][:160] if lines else ""
            errors.append(f"{type(exc).__name__}: {head}{' ... ' + detail.strip()[:200] if detail else ''}")
        if not arch:
            break
    _failure = "native build failed: " + "; ".join(errors)


def status() -> tuple[bool, str]:
    """(available, one-line reason); builds the extension on the first call in a process."""
    if os.environ.get("DCNBENCH_NO_NATIVE", "") not in ("", "0"):
        return False, "disabled by DCNBENCH_NO_NATIVE"
    if _module is None and _failure is None:
        with _lock:
            if _module is None and _failure is None:
                _build()
    if _module is not None:
        return True, _built
    return False, str(_failure)


def _ext() -> ModuleType:
    ok, why = status()
    if not ok:
        raise RuntimeError(f"dcnbench native backend unavailable: {why}")
    assert _module is not None
    return _module


def deform_conv2d_forward(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, stride, padding,
                          dilation, mask: Tensor | None) -> Tensor:
    return _ext().deform_conv2d_forward(input, offset, weight, bias, list(stride), list(padding), list(dilation), mask)


def deform_conv2d_backward(grad_out: Tensor, input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None,
                           stride, padding, dilation, mask: Tensor | None):
    gi, go, gw, gb, gm = _ext().deform_conv2d_backward(grad_out, input, offset, weight, bias, list(stride),
                                                       list(padding), list(dilation), mask)
    # Absent grads come back as distinct empty tensors, not None: the custom op turns None into one
    # shared empty tensor, which torch.library rejects as two aliasing outputs (see dispatch.py).
    return gi, go, gw, input.new_empty((0,)) if gb is None else gb, input.new_empty((0,)) if gm is None else gm


def roi_pool_forward(input: Tensor, rois: Tensor, offset: Tensor | None, output_size, spatial_scale: float,
                     sampling_ratio: int, gamma: float, position_sensitive: bool) -> Tensor:
    return _ext().roi_pool_forward(input, rois, offset, list(output_size), float(spatial_scale), int(sampling_ratio),
                                   float(gamma), bool(position_sensitive))


def roi_pool_backward(grad_out: Tensor, input: Tensor, rois: Tensor, offset: Tensor | None, output_size,
                      spatial_scale: float, sampling_ratio: int, gamma: float, position_sensitive: bool):
    return _ext().roi_pool_backward(grad_out, input, rois, offset, list(output_size), float(spatial_scale),
                                    int(sampling_ratio), float(gamma), bool(position_sensitive))
