"""Predictor factors on per-row int8 grids: snapping, and recognising the grid again."""
import torch

from edgesparse.backends.formats import int8_rows
from edgesparse.predictors.int8 import snap_rows


def test_snapped_rows_are_recovered_also_from_a_bf16_copy():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(37, 300, generator=g) * torch.logspace(-3, 2, 37)[:, None]   # very different row scales
    snapped = snap_rows(m)
    assert (snapped - m).abs().max(dim=1).values.le(m.abs().amax(dim=1) / 254 * 1.0001).all()   # half a step
    rows = int8_rows(snapped)
    assert rows is not None and rows.q.dtype == torch.int8 and rows.q.abs().max() == 127
    assert torch.allclose(rows.q.float() * rows.s[:, None], snapped, rtol=1e-6, atol=0)
    copy = snapped.bfloat16()   # what a bf16 model gets from the artifacts
    again = int8_rows(copy)
    # the copy's rounding (and its rounded row maximum) may move an entry near the maximum by
    # one step; the int8 rows then still match the bf16 factors the torch ops use
    assert again is not None and (again.q.int() - rows.q.int()).abs().max() <= 1
    assert torch.allclose(again.q.float() * again.s[:, None], copy.float(), rtol=2**-7, atol=0)


def test_off_grid_factors_are_left_alone():
    g = torch.Generator().manual_seed(1)
    assert int8_rows(torch.randn(8, 64, generator=g)) is None
    assert int8_rows(torch.randn(8, 64, generator=g).bfloat16()) is None


def test_zero_rows_stay_zero():
    m = torch.zeros(3, 16)
    m[1] = torch.arange(16.0)
    rows = int8_rows(snap_rows(m))
    assert rows is not None and rows.q[0].abs().sum() == 0 and rows.q[2].abs().sum() == 0
