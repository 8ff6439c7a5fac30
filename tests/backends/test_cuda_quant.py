"""The cuda backend's Triton kernels over q8_0 / q4_0 / q4_1 rows against the de-quantising
reference: 0 / 1 / some / all rows, repeated rows, batch 1, 3, 8 and 9.  Without a GPU they run
under the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
import pytest
import torch

from edgesparse.backends.formats import quantize_rows

qk = pytest.importorskip("edgesparse.backends.cuda.row_kernels")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("batch", [1, 3, 8, 9])   # 9: above MAX_BATCH, the de-quantised matmul
def test_rows_dot_and_matvec(fmt, batch):
    g = torch.Generator().manual_seed(0)
    w = quantize_rows(torch.randn(37, 96, generator=g) + 0.3, fmt)
    w.data = w.data.to(DEV)
    x = torch.randn(batch, 96, generator=g)
    for idx in ([], [7], [5, 0, 36, 7, 7], list(range(37))):
        idx = torch.tensor(idx, dtype=torch.long)
        ref = x @ w.rows(idx.to(DEV)).cpu().T
        torch.testing.assert_close(qk.rows_dot(x.to(DEV), w, idx.to(DEV)).cpu(), ref, atol=1e-4, rtol=1e-4)
        c = torch.randn(batch, idx.numel(), generator=g)
        ref = c @ w.rows(idx.to(DEV)).cpu() if idx.numel() else torch.zeros(batch, 96)
        torch.testing.assert_close(qk.rows_matvec(c.to(DEV), w, idx.to(DEV)).cpu(), ref, atol=1e-4, rtol=1e-4)
