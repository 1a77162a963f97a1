"""Bad input raises ValueError/TypeError naming the argument with expected vs given; never a crash."""

import warnings

import pytest
import torch

from dcnbench.ops import (DeformConv2d, DeformPSRoIPool, DeformRoIPool, deform_conv2d, deform_ps_roi_pool,
                          deform_roi_pool)


def conv_args(**overrides):
    args = dict(
        input=torch.randn(2, 4, 8, 8),
        offset=torch.randn(2, 18, 8, 8),
        weight=torch.randn(6, 4, 3, 3),
        bias=None,
        stride=1,
        padding=1,
        dilation=1,
        mask=None,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,error,pattern",
    [
        (dict(input=torch.randn(4, 8, 8)), ValueError, r"input must be 4-D, got shape \(4, 8, 8\)"),
        (dict(offset=torch.randn(2, 17, 8, 8)), ValueError, r"offset must have shape \(2, 2\*offset_groups\*3\*3, 8, 8\).*got \(2, 17, 8, 8\)"),
        (dict(offset=torch.randn(2, 18, 7, 8)), ValueError, r"offset must have shape .*got \(2, 18, 7, 8\)"),
        (dict(offset=torch.randn(3, 18, 8, 8)), ValueError, r"offset must have shape \(2, .*got \(3, 18, 8, 8\)"),
        (dict(mask=torch.rand(2, 18, 8, 8)), ValueError, r"mask must have shape \(2, 9, 8, 8\).*got \(2, 18, 8, 8\)"),
        (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, r"weight expects 3 input channels per group.*input's 4 channels"),
        (dict(weight=torch.randn(5, 2, 3, 3)), ValueError, r"5 output channels are not divisible by the 2 groups"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\), got \(5,\)"),
        (dict(offset=torch.randn(2, 18, 8, 8, dtype=torch.float64)), TypeError, r"offset has dtype torch.float64 but input has dtype torch.float32"),
        (dict(weight=torch.randn(6, 4, 3, 3).half()), TypeError, r"weight has dtype torch.float16"),
        (dict(input=torch.randint(0, 3, (2, 4, 8, 8))), TypeError, r"input must be a floating-point tensor, got dtype torch.int64"),
        (dict(input=torch.randn(2, 4, 8, 8).numpy()), TypeError, r"input must be a torch.Tensor, got ndarray"),
        (dict(stride=0), ValueError, r"stride must be >= 1"),
        (dict(padding=(1, 2, 3)), TypeError, r"padding must be an int or a pair of ints"),
        (dict(input=torch.randn(2, 4, 1, 1), padding=0), ValueError, r"input of spatial size \(1, 1\) is too small"),
        (dict(offset=torch.randn(2, 54, 8, 8)), ValueError, r"3 offset groups, which does not divide input's 4 channels"),
        # An empty map with padding has a non-empty output that samples nothing (was a segfault).
        (dict(input=torch.randn(2, 4, 0, 6), weight=torch.randn(6, 4, 1, 1), offset=torch.randn(2, 2, 2, 8)), ValueError,
         r"input must have a non-empty feature map \(height and width >= 1\), got shape \(2, 4, 0, 6\)"),
    ],
)
def test_deform_conv2d_bad_input(overrides, error, pattern):
    args = conv_args(**overrides)
    with pytest.raises(error, match=pattern):
        deform_conv2d(**args)


def test_deform_conv2d_device_mismatch():
    args = conv_args(offset=torch.randn(2, 18, 8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"offset is on meta but input is on cpu"):
        deform_conv2d(**args)


@pytest.mark.parametrize(
    "args,kwargs,error,pattern",
    [
        ((8, 4, 0), {}, ValueError, r"kernel_size must be >= 1, got \(0, 0\)"),
        ((8, 4, (3, 0)), {}, ValueError, r"kernel_size must be >= 1, got \(3, 0\)"),
        ((8, 4, 3), dict(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
        ((8, 4, 3), dict(padding=-1), ValueError, r"padding must be >= 0, got \(-1, -1\)"),
        ((8, 4, 3), dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
        ((0, 4, 3), {}, ValueError, r"in_channels must be >= 1, got 0"),
        ((8, -4, 3), {}, ValueError, r"out_channels must be >= 1, got -4"),
        ((8, 4, 3), dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
        ((8, 4, 3), dict(offset_groups=0), ValueError, r"offset_groups must be >= 1, got 0"),
        ((8.0, 4, 3), {}, TypeError, r"in_channels must be an int, got 8.0"),
        ((8, 4, 3), dict(groups=3), ValueError, r"groups \(3\) must divide in_channels \(8\) and out_channels \(4\)"),
        ((8, 6, 3), dict(groups=4), ValueError, r"groups \(4\) must divide in_channels \(8\) and out_channels \(6\)"),
        ((8, 4, 3), dict(offset_groups=3), ValueError, r"offset_groups \(3\) must divide in_channels \(8\)"),
        ((8, 4, (3, 3, 3)), {}, TypeError, r"kernel_size must be an int or a pair of ints"),
    ],
)
def test_deform_conv2d_module_bad_arguments(args, kwargs, error, pattern):
    """Raised before any parameter is built: no init warnings first, no ZeroDivisionError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(error, match=pattern):
            DeformConv2d(*args, **kwargs)


@pytest.mark.parametrize(
    "shape,pattern",
    [
        ((1, 5, 10, 10), r"input must have 8 channels \(in_channels\), got shape \(1, 5, 10, 10\)"),
        ((8, 10, 10), r"input must be 4-D, got shape \(8, 10, 10\)"),
        ((1, 8, 2, 10), r"input of spatial size \(2, 10\) is too small for kernel \(3, 3\)"),
    ],
)
def test_deform_conv2d_module_bad_input_is_named_not_the_offset_branch(shape, pattern):
    """The input is checked before the offset branch's conv, whose weight shape the user never chose."""
    layer = DeformConv2d(8, 4, 3)
    with pytest.raises(ValueError, match=pattern):
        layer(torch.randn(shape))
    with pytest.raises(ValueError, match=pattern):
        layer.offsets(torch.randn(shape))


def roi_args(**overrides):
    args = dict(
        input=torch.randn(2, 2 * 9, 8, 8),
        rois=torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 1.0, 1.0, 6.0, 6.0]]),
        offset=None,
        output_size=3,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize("op", [deform_roi_pool, deform_ps_roi_pool])
@pytest.mark.parametrize(
    "overrides,error,pattern",
    [
        (dict(rois=torch.randn(2, 4)), ValueError, r"rois must have shape \(K, 5\).*got \(2, 4\)"),
        (dict(rois=torch.tensor([[2, 0.0, 0.0, 4.0, 4.0]])), ValueError, r"rois\[:, 0\] must hold integer batch indices in \[0, 1\].*got 2"),
        (dict(rois=torch.tensor([[-1, 0.0, 0.0, 4.0, 4.0]])), ValueError, r"batch indices .* got -1"),
        (dict(rois=torch.tensor([[0.5, 0.0, 0.0, 4.0, 4.0]])), ValueError, r"batch indices .* got 0.5"),
        (dict(rois=torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [float("nan"), 0.0, 0.0, 4.0, 4.0]])), ValueError,
         r"batch indices .* got nan"),
        (dict(rois=torch.tensor([[float("inf"), 0.0, 0.0, 4.0, 4.0]])), ValueError, r"batch indices .* got inf"),
        (dict(rois=[torch.randn(2, 5)]), ValueError, r"rois\[0\] must be a \(Ki, 4\) tensor"),
        (dict(rois=[torch.zeros(1, 4)] * 3), ValueError,
         r"rois as a list must hold one \(Ki, 4\) tensor per image: got 3 for input of batch 2 "
         r"\(shape \(2, 18, 8, 8\)\)"),
        (dict(rois=torch.tensor([[0, 0, 0, 4, 4]])), TypeError, r"rois must be a floating-point tensor, got dtype torch.int64"),
        (dict(rois=torch.zeros(1, 5, device="meta")), ValueError, r"rois is on meta but input is on cpu"),
        (dict(offset=torch.randn(3, 2, 3, 3)), ValueError, r"offset must have shape \(2, 2\*n, P, P\).*got \(3, 2, 3, 3\)"),
        (dict(offset=torch.randn(2, 3, 3, 3)), ValueError, r"offset must have shape .*got \(2, 3, 3, 3\)"),
        (dict(offset=torch.randn(2, 2, 3)), ValueError, r"offset must be 4-D"),
        (dict(input=torch.randn(2, 18, 8)), ValueError, r"input must be 4-D"),
        (dict(output_size=0), ValueError, r"output_size must be positive"),
        (dict(sampling_ratio=0), ValueError, r"sampling_ratio must be >= 1"),
        (dict(rois="boxes"), TypeError, r"rois must be a \(K, 5\) tensor or a list"),
        (dict(rois=torch.tensor([[0, 0.0, 0.0, float("nan"), 4.0]])), ValueError,
         r"rois must hold finite box coordinates, got \[0.0, 0.0, 0.0, nan, 4.0\] in row 0"),
        (dict(rois=[torch.zeros(0, 4), torch.tensor([[1.0, -float("inf"), 4.0, 4.0]])]), ValueError,
         r"rois must hold finite box coordinates, got \[1.0, 1.0, -inf, 4.0, 4.0\] in row 0"),
        (dict(input=torch.randn(2, 18, 0, 8)), ValueError, r"input must have a non-empty feature map \(height and width >= 1\), got shape \(2, 18, 0, 8\)"),
        (dict(input=torch.randn(2, 18, 8, 0)), ValueError, r"input must have a non-empty feature map"),
        (dict(sampling_ratio=2.5), TypeError, r"sampling_ratio must be an int, got 2.5"),
        (dict(sampling_ratio=True), TypeError, r"sampling_ratio must be an int, got True"),
        (dict(spatial_scale=float("inf")), ValueError, r"spatial_scale must be finite and > 0, got inf"),
        (dict(spatial_scale=0.0), ValueError, r"spatial_scale must be finite and > 0, got 0.0"),
        (dict(offset=torch.randn(2, 2, 3, 3), gamma=float("nan")), ValueError, r"gamma must be finite, got nan"),
        # were TypeErrors of a comparison or AttributeErrors naming no argument
        (dict(spatial_scale="0.5"), TypeError, r"spatial_scale must be a real number, got '0.5'"),
        (dict(spatial_scale=None), TypeError, r"spatial_scale must be a real number, got None"),
        (dict(spatial_scale=torch.tensor([1.0, 2.0])), TypeError, r"spatial_scale must be a real number, got tensor"),
        (dict(gamma=None), TypeError, r"gamma must be a real number, got None"),
        (dict(gamma=1j), TypeError, r"gamma must be a real number, got 1j"),
        (dict(input=None), TypeError, r"input must be a torch.Tensor, got NoneType"),
        # torchvision's roi_align order (output_size third) read the output size as the offsets
        (dict(offset=2), TypeError, r"offset \(the third argument\) must be a Tensor or None, got 2; torchvision's "
                                    r"roi_align and ps_roi_align take output_size third"),
    ],
)
def test_roi_pool_bad_input(op, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        op(**roi_args(**overrides))


def test_ps_roi_pool_channels_not_divisible():
    with pytest.raises(ValueError, match=r"input channels \(10\) must be divisible by .* = 9"):
        deform_ps_roi_pool(**roi_args(input=torch.randn(2, 10, 8, 8)))


def test_offset_classes_must_divide_output_channels():
    with pytest.raises(ValueError, match=r"offset has 4 offset classes, which must divide the 18 output channels"):
        deform_roi_pool(**roi_args(offset=torch.randn(2, 8, 3, 3)))


@pytest.mark.parametrize(
    "module,inputs,pattern",
    [
        (DeformRoIPool(4, 3), [(2, 8, 16, 16)],
         r"input must have 4 channels \(in_channels\), got shape \(2, 8, 16, 16\)"),
        (DeformPSRoIPool(4, 2, 3), [(2, 17, 16, 16), (2, 4, 16, 16)],
         r"score_maps must have 18 channels \(out_channels\*kh\*kw\), got shape \(2, 17, 16, 16\)"),
        (DeformPSRoIPool(4, 2, 3), [(2, 18, 16, 16), (2, 5, 16, 16)],
         r"features must have 4 channels \(in_channels\), got shape \(2, 5, 16, 16\)"),
    ],
)
def test_roi_pool_modules_check_channels_up_front(module, inputs, pattern):
    """Named before the offset branch (fc / conv) fails on a shape the user never chose."""
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 9.0]])
    with pytest.raises(ValueError, match=pattern):
        module(*[torch.randn(shape) for shape in inputs], rois)


def test_numpy_and_tensor_integers_are_accepted_as_sizes():
    """As torchvision's ops take them: numpy and 0-d tensor integers for stride, padding, dilation
    and output_size give the same result as Python ints (bools stay refused)."""
    import numpy as np

    args = conv_args(padding=1)
    want = deform_conv2d(**args)
    got = deform_conv2d(**{**args, "stride": np.int64(1), "padding": (np.int32(1), torch.tensor(1)),
                           "dilation": [1, np.int64(1)]})
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints, got \(True, 1\)"):
        deform_conv2d(**{**args, "stride": (True, 1)})
    roi = roi_args()
    assert torch.equal(deform_ps_roi_pool(**{**roi, "output_size": np.int64(3), "sampling_ratio": np.int64(2)}),
                       deform_ps_roi_pool(**{**roi, "sampling_ratio": 2}))
    assert DeformConv2d(4, 4, np.int64(3), padding=np.int64(1)).kernel_size == (3, 3)
    assert DeformConv2d(np.int64(4), np.int32(4), 3, padding=1)(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)
    with pytest.raises(TypeError, match=r"padding must be an int or a pair of ints, got tensor\(\[1\]\)"):
        deform_conv2d(**{**args, "padding": torch.tensor([1])})  # one element, but not 0-d


@pytest.mark.parametrize(
    "build,error,pattern",
    [
        (lambda: DeformPSRoIPool(4, 3, 2, offset_groups=0), ValueError, r"offset_groups must be >= 1, got 0"),
        (lambda: DeformPSRoIPool(4, 0, 2), ValueError, r"out_channels must be >= 1, got 0"),
        (lambda: DeformPSRoIPool(4, 3, (2, 0)), ValueError, r"output_size must be positive, got \(2, 0\)"),
        (lambda: DeformPSRoIPool(4, 3, 2, sampling_ratio=1.5), TypeError, r"sampling_ratio must be an int, got 1.5"),
        (lambda: DeformRoIPool(-1, 2), ValueError, r"in_channels must be >= 1, got -1"),
        (lambda: DeformRoIPool(4.0, 2), TypeError, r"in_channels must be an int, got 4.0"),
        (lambda: DeformRoIPool(4, 0), ValueError, r"output_size must be positive, got \(0, 0\)"),
        (lambda: DeformRoIPool(4, 2, spatial_scale=-0.0625), ValueError, r"spatial_scale must be finite and > 0"),
        (lambda: DeformRoIPool(4, 2, gamma=float("inf")), ValueError, r"gamma must be finite, got inf"),
    ],
)
def test_roi_pool_module_bad_arguments(build, error, pattern):
    """Raised by the constructor, naming the argument: no ZeroDivisionError, no negative-size
    tensor error from the offset branch, no module that only fails at its first call."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(error, match=pattern):
            build()


def test_roi_checks_accept_every_finite_box_and_integer_index():
    """Finite boxes of any magnitude (up to float32's largest value) and integer batch indices at
    both ends of the batch (0 and N-1) pass the value checks."""
    from dcnbench.ops._validate import check_roi_pool

    big = torch.finfo(torch.float32).max
    rois = torch.tensor([[0, -big, -big, big, big], [1, 0.0, 0.0, 4.0, 4.0], [1, 1.5, 2.5, 3.5, 4.5]])
    assert check_roi_pool(torch.randn(2, 18, 8, 8), rois, None, (3, 3), 1.0, 2, 0.1, False) == 18
