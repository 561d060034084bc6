"""Triton group advantages (interpreted on CPU) against the reference."""
import pytest
import torch

from megatron_r1.ops import reference as R
from megatron_r1.ops import triton_kernels


@pytest.mark.parametrize("group_size", [1, 3, 8, 33])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_triton_group_advantages(group_size, scale):
    r = torch.rand(4 * group_size, generator=torch.Generator().manual_seed(group_size))
    r[:group_size] = 1.0  # a group with no spread
    got = triton_kernels.group_advantages(r, group_size, scale)
    torch.testing.assert_close(got, R.group_advantages(r, group_size, scale))
    assert torch.isfinite(got).all()


def test_triton_group_advantages_rejects_ragged():
    with pytest.raises(ValueError):
        triton_kernels.group_advantages(torch.zeros(5), 2)
