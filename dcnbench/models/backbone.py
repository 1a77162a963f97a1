"""The feature extraction network of paper section 2.3: a ResNet with conv5 at stride 1.

Built from torchvision's ``Bottleneck`` blocks, with torchvision's module names (``conv1``, ``bn1``,
``layer1`` ... ``layer4``) so an ImageNet ResNet state dict loads into it key for key. Differences
from ``torchvision.models.resnet101``:

- conv5 (``layer4``) has stride 1 and *every* 3×3 conv in it has dilation ``dilation`` (paper: 2;
  Table 3 tries 4, 6, 8), so the output stride is 16. With ``output_stride=8`` conv4 (``layer3``) is
  also at stride 1, with dilation ``res4_dilation``.
- No average pooling / fc; a 1×1 conv + ReLU (``reduce``) brings the channels to ``out_channels``
  (1024; 256 for the Faster R-CNN light head).
- Deformable placement by Table 1's row names: the named blocks' 3×3 ``conv2`` becomes
  ``DeformConv2d.from_conv(conv2)`` (same weight, zero-initialized offset conv with the same kernel,
  padding and dilation, 2·offset_groups·9 outputs).

The paper tier is ResNet-101 (blocks [3, 4, 23, 3], stem width 64, frozen BatchNorm); the scaled
family keeps the stages, the res5 dilation and the placement logic with fewer blocks and channels.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from dcnbench.ops import DeformConv2d

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# Table 1's rows: stage -> how many of its *last* blocks get a deformable conv2.
# In ResNet-101 res5 has blocks a, b, c and res4 has a, b1 ... b22, so these are exactly the
# named layers; in the scaled family they are the same positions counted from the stage's end.
PLACEMENTS: dict[str, dict[str, int]] = {
    "none": {},
    "res5c": {"res5": 1},
    "res5b-c": {"res5": 2},
    "res5a-c": {"res5": 3},
    "res5+res4b20-22": {"res5": 3, "res4": 3},
}
_STAGE_ATTR = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


def block_name(stage: str, index: int, num_blocks: int, *, lettered: bool = False) -> str:
    """Caffe/MSRA-style name of block ``index`` in a stage of ``num_blocks``.

    Lettered (res5a, res5b, ...): res2, res5, stages of up to 3 blocks, and every stage when
    ``lettered`` (MSRA's ResNet-50: res3a-d, res4a-f). Otherwise the first block is ``a`` and the
    others are numbered (MSRA's ResNet-101: res3a, res3b1-b3, res4a, res4b1-b22; ResNet-152 alike).
    The scaled family has no MSRA names; it follows the rule unlettered.
    """
    if lettered or num_blocks <= 3 or stage in ("res2", "res5"):
        return f"{stage}{'abcdefghijklmnopqrstuvwxyz'[index]}"
    return f"{stage}a" if index == 0 else f"{stage}b{index}"


class ResNetBackbone(nn.Module):
    """ResNet feature extractor; forward(x) -> (conv4 features, reduced conv5 features).

    Args:
        blocks: blocks per stage (res2..res5), e.g. (3, 4, 23, 3) for ResNet-101.
        width: stem width; stage i has ``width * 2**i`` planes and ``4 *`` that many outputs.
        dilation: dilation of every 3×3 conv in res5 (stride 1).
        output_stride: 16 (res5 at stride 1) or 8 (res4 too, with ``res4_dilation``).
        out_channels: channels of the 1×1 reduction conv after res5 (0: none).
        placement: a Table 1 row name (``PLACEMENTS``) or an explicit list of block names.
        offset_groups: offset groups of each deformable conv (paper section 2.1: 1).
        frozen_bn: FrozenBatchNorm2d (paper tier, fine-tuning from ImageNet) or BatchNorm2d.
        freeze_at: how many of (stem, res2, res3, res4, res5) keep their weights fixed in training
            (0: none; 2: conv1 and res2, as the released code fine-tunes ImageNet weights).
    """

    def __init__(
        self,
        blocks: Sequence[int] = DEPTHS[101],
        width: int = 64,
        dilation: int = 2,
        output_stride: int = 16,
        res4_dilation: int = 2,
        out_channels: int = 1024,
        placement: str | Sequence[str] = "none",
        offset_groups: int = 1,
        frozen_bn: bool = True,
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive counts (res2..res5), got {blocks!r}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5 (stem, res2, ..., res5), got {freeze_at}")
        if freeze_at and not frozen_bn:
            raise ValueError(f"freeze_at={freeze_at} needs frozen_bn=True: a fixed stage's BatchNorm2d would still "
                             "update its running statistics in training")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.blocks, self.width, self.dilation, self.output_stride = tuple(blocks), width, dilation, output_stride
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        specs = [(1, 1), (2, 1), (2, 1) if output_stride == 16 else (1, res4_dilation), (1, dilation)]
        for i, (n, (stride, dil)) in enumerate(zip(blocks, specs)):
            planes = width * 2**i
            layer, inplanes = self._make_stage(inplanes, planes, n, stride, dil, norm)
            setattr(self, f"layer{i + 1}", layer)
        self.conv4_channels = width * 4 * 4
        self.conv5_channels = inplanes
        if out_channels:
            self.reduce = nn.Sequential(nn.Conv2d(inplanes, out_channels, kernel_size=1), nn.ReLU(inplace=True))
            self.out_channels = out_channels
        else:
            self.reduce = nn.Identity()
            self.out_channels = inplanes
        self.deformable_blocks = self._make_deformable(placement, offset_groups)
        fixed = [name for name in self.deformable_blocks if int(name[3]) - 1 < freeze_at]  # resK is stage K - 1
        if fixed:
            raise ValueError(f"freeze_at={freeze_at} fixes the stages of the deformable blocks {fixed}: their "
                             "zero-initialised offsets would never train (lower freeze_at or change placement)")
        stages = [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]
        for stage in stages[:freeze_at]:
            stage.requires_grad_(False)

    @staticmethod
    def _make_stage(inplanes: int, planes: int, n: int, stride: int, dilation: int, norm) -> tuple[nn.Sequential, int]:
        downsample = None
        if stride != 1 or inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                norm(planes * Bottleneck.expansion),
            )
        # Every 3×3 conv in a dilated stage has the stage's dilation (paper 2.3), the first included.
        layers = [Bottleneck(inplanes, planes, stride, downsample, dilation=dilation, norm_layer=norm)]
        inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(inplanes, planes, dilation=dilation, norm_layer=norm) for _ in range(n - 1)]
        return nn.Sequential(*layers), inplanes

    def stage_block_names(self) -> dict[str, list[str]]:
        """{"res2": ["res2a", "res2b", ...], ...} for this network's depth (``block_name``; lettered
        for ResNet-50's blocks (3, 4, 6, 3), as MSRA names them)."""
        lettered = self.blocks == DEPTHS[50]
        return {stage: [block_name(stage, i, n, lettered=lettered) for i in range(n)]
                for stage, n in zip(_STAGE_ATTR, self.blocks)}

    def block(self, name: str) -> Bottleneck:
        """The block called ``name`` (``"res5a"``, ``"res4b22"``, ...)."""
        for stage, names in self.stage_block_names().items():
            if name in names:
                return getattr(self, _STAGE_ATTR[stage])[names.index(name)]
        raise KeyError(f"no block {name!r}; this network has {sum(self.stage_block_names().values(), [])}")

    def _make_deformable(self, placement: str | Sequence[str], offset_groups: int) -> list[str]:
        names = resolve_placement(placement, self.stage_block_names())
        for name in names:
            block = self.block(name)
            block.conv2 = DeformConv2d.from_conv(block.conv2, offset_groups=offset_groups)
        return names

    def conv4(self, x: Tensor) -> Tensor:
        """Image (N, 3, H, W) -> conv4 features (N, 16w, H/16, W/16) (H/8 at output stride 8)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def body(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image (N, 3, H, W) -> (conv4 (N, 16w, H/16, W/16), conv5 (N, 32w, H/16, W/16)) at output stride 16."""
        c4 = self.conv4(x)
        return c4, self.layer4(c4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image (N, 3, H, W) -> (conv4 features, reduced features (N, out_channels, H/s, W/s))."""
        c4, c5 = self.body(x)
        return c4, self.reduce(c5)


def resolve_placement(placement: str | Sequence[str], stage_names: dict[str, list[str]]) -> list[str]:
    """Block names that a placement makes deformable, in network order."""
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)} or a list of block names, got {placement!r}")
        names = []
        for stage, count in PLACEMENTS[placement].items():
            blocks = stage_names[stage]
            if count > len(blocks):
                raise ValueError(f"placement {placement!r} needs {count} blocks in {stage}, this network has {len(blocks)}")
            names += blocks[-count:]
    else:
        names = list(placement)
        known = {n for ns in stage_names.values() for n in ns}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown block names {unknown}; known: {sorted(known)}")
    order = [n for ns in stage_names.values() for n in ns]
    return sorted(set(names), key=order.index)


def deformable_layers(model: nn.Module) -> list[str]:
    """Qualified names of every DeformConv2d in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, DeformConv2d)]


def _body_keys(backbone: ResNetBackbone) -> list[str]:
    """State-dict keys an ImageNet ResNet checkpoint provides for this backbone (no offset convs,
    no reduction conv, no BN step counters)."""
    return [
        k for k in backbone.state_dict()
        if not k.startswith("reduce.") and ".offset_conv." not in k and not k.endswith("num_batches_tracked")
    ]


def load_weights_file(path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (user files are untrusted); a file it
    cannot read, a missing one included, raises a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # missing file, a directory, permissions
        raise ValueError(f"{path}: cannot read the weights file ({err.strerror or err})") from err
    except pickle.UnpicklingError as err:  # not a pickle, or objects weights_only refuses
        raise ValueError(f"{path}: not a weights-only PyTorch checkpoint: torch.load(weights_only=True) refuses "
                         f"it (not a PyTorch file, or it pickles objects other than tensors and plain containers: "
                         f"a whole model? save its state_dict() instead)") from err
    except Exception as err:  # a truncated archive, an empty file, ...
        raise ValueError(f"{path}: not a weights-only PyTorch checkpoint: torch.load cannot read it "
                         f"({type(err).__name__}: {str(err)[:200]})") from err


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load an ImageNet ResNet state dict (torchvision key names) into ``model``'s backbone.

    ``model`` is a :class:`ResNetBackbone` or has one as ``model.backbone``. The file is read with
    ``torch.load(path, map_location="cpu", weights_only=True)``; a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped. Keys are checked strictly: the ImageNet classifier
    (``fc.*``) and BN ``num_batches_tracked`` counters are ignored; the offset convs (zero-init) and
    the 1×1 reduction conv are new layers the file does not hold. A file ``torch.load`` cannot read
    with ``weights_only=True``, or a missing one, raises a ``ValueError`` naming it; one that is not a dict of tensors
    keyed by name a ``TypeError``; any other missing or unexpected key, or a shape mismatch, a
    ``ValueError`` that lists them.
    """
    backbone = model if isinstance(model, ResNetBackbone) else getattr(model, "backbone", None)
    if not isinstance(backbone, ResNetBackbone):
        raise TypeError(f"expected a ResNetBackbone or a model with .backbone, got {type(model).__name__}")
    state = load_weights_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state dict (key -> tensor), the file holds a {type(state).__name__}")
    not_names = [k for k in state if not isinstance(k, str)]
    if not_names:
        raise TypeError(f"{path}: expected a state dict (key -> tensor), these keys are not strings: {not_names[:10]}")
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.removeprefix("module.").startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = _body_keys(backbone)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in set(expected)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the backbone (blocks {backbone.blocks}, width {backbone.width}).\n"
            f"  missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    not_tensors = [k for k in expected if not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        raise TypeError(f"{path}: expected a state dict (key -> tensor), these entries are not tensors: "
                        f"{not_tensors[:10]}{' ...' if len(not_tensors) > 10 else ''}")
    own = backbone.state_dict()
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in expected if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {len(bad)} tensors: {bad[:10]}")
    backbone.load_state_dict(state, strict=False)
