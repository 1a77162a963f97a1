"""The paper's three operators as drop-in PyTorch ops, over one backend dispatch.

Functional ops: :func:`deform_conv2d`, :func:`deform_roi_pool`, :func:`deform_ps_roi_pool`.
Modules: :class:`DeformConv2d`, :class:`DeformRoIPool`, :class:`DeformPSRoIPool`.
Backends: :func:`available_backends`, :func:`backend_for`, :func:`use_backend`.
"""

import torch

from .deform_conv import DeformConv2d, deform_conv2d
from .deform_roi_pool import DeformPSRoIPool, DeformRoIPool, deform_ps_roi_pool, deform_roi_pool, offset_param_groups
from .dispatch import BACKENDS, available_backends, backend_for, use_backend

# Calls as dcnbench.ops.deform_conv2d(...) are one node under FX symbolic tracing, as the modules' calls.
for _name in ("deform_conv2d", "deform_roi_pool", "deform_ps_roi_pool"):
    torch.fx.wrap(_name)
del _name

__all__ = [
    "BACKENDS",
    "DeformConv2d",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "available_backends",
    "backend_for",
    "deform_conv2d",
    "deform_ps_roi_pool",
    "deform_roi_pool",
    "offset_param_groups",
    "use_backend",
]
