"""``StageOutputs`` (runtime/step/outputs.py) is a real mapping: get, ``in``, iteration and len see the
partitions of a fused output too, whose slices are views cut on first read; a fused tensor is dropped
with its last partition."""

from __future__ import annotations

from collections.abc import MutableMapping

import pytest
import torch

from gndgl_compiler.runtime.step.outputs import StageOutputs


def test_stage_outputs_is_a_mapping_over_plain_and_fused_outputs():
    x = torch.arange(24.0).view(2, 3, 4)
    fused = torch.arange(2 * 5 * 4.0).view(2, 5, 4)
    h = StageOutputs({-1: x})
    h.put_fused([3, 4], fused, widths=[2, 3])
    assert isinstance(h, MutableMapping)
    assert sorted(h) == [-1, 3, 4] and len(h) == 3 and 4 in h and 5 not in h
    assert h.get(5) is None and h.get(-1) is x
    got = h.get(4)
    assert torch.equal(got, fused[:, 2:5]) and got.data_ptr() == fused[:, 2:].data_ptr()  # a view, not a copy
    assert h[4] is got and len(h) == 3  # cut once, counted once
    assert dict(h.items()).keys() == {-1, 3, 4}
    assert h.get_fused([3, 4]) is fused and h.get_fused([4, 3]) is None
    with pytest.raises(KeyError):
        h[7]


def test_fused_tensor_goes_with_its_last_partition():
    h = StageOutputs({})
    h.put_fused([1, 2], torch.zeros(2, 4, 1))  # equal widths
    assert h[2].shape == (2, 2, 1)
    h.pop(1)
    assert h.get_fused([1, 2]) is not None and 1 not in h
    del h[2]
    assert h.get_fused([1, 2]) is None and len(h) == 0
    assert h.pop(2, "none") == "none"
    with pytest.raises(KeyError):
        del h[2]
