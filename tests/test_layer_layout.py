"""The layers hand their output convolution a contiguous ``(B, C, *spatial)`` tensor: a channels-last view
would make the convolution and BatchNorm after it run channels-last, whose CPU backward is many times
slower (docs/benchmarks.md, the layers against the blocks they replace)."""

import pytest
import torch

from nonlocal_ext.nn import NonLocal1d, NonLocal2d, NonLocal3d
from nonlocal_ext.nn._common import channels_first


def test_channels_first_is_contiguous_and_exact():
    y = torch.randn(2, 12, 5)  # (B, N, C), N = 3 × 4
    out = channels_first(y, (3, 4))
    assert out.shape == (2, 5, 3, 4) and out.is_contiguous()
    assert torch.equal(out, y.transpose(1, 2).reshape(2, 5, 3, 4))


@pytest.mark.parametrize("layer,spatial", [(NonLocal1d, (9,)), (NonLocal2d, (6, 7)), (NonLocal3d, (2, 4, 6))])
@pytest.mark.parametrize("pool_input", [False, True])
def test_the_output_convolution_sees_a_contiguous_input(layer, spatial, pool_input):
    block = layer(8, sub_sample=True, pool_input=pool_input)
    seen = []
    block.W[0].register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    x = torch.randn(2, 8, *spatial, requires_grad=True)
    block(x).sum().backward()
    (conv_in, conv_out), = seen
    assert conv_in.is_contiguous() and conv_out.is_contiguous()
