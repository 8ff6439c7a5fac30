"""Block formats (q8_0, q4_0): quantisation, the de-quantising reference, and bad shapes."""
import pytest
import torch

from edgesparse.backends.formats import BLOCK_BYTES, QuantRows, quantizable, quantize_rows


@pytest.mark.parametrize("fmt, worst", [("q8_0", 1 / 127), ("q4_0", 1 / 8), ("q4_1", 1 / 15)])
@pytest.mark.parametrize("n, cols", [(1, 32), (37, 96), (5, 4096)])
def test_round_trip_error_is_bounded_per_block(fmt, worst, n, cols):
    m = torch.randn(n, cols, generator=torch.Generator().manual_seed(n))
    q = quantize_rows(m, fmt)
    assert q.shape == (n, cols) and q.data.dtype == torch.uint8
    assert q.data.shape == (n, cols // 32 * BLOCK_BYTES[fmt])
    blocks = m.view(n, -1, 32)
    err = (q.rows() - m).abs().view(n, -1, 32)
    # q8_0: half a step of max|block|/127; q4_0: one step of max|block|/8 at the far end
    bound = blocks.abs().amax(-1, keepdim=True) * worst * 1.01 + 1e-6
    assert bool((err <= bound).all())


def test_q4_0_layout_and_exact_values():
    # A block on the grid: scale 0.5 (from the entry of largest magnitude, -4 = -8 * 0.5).
    vals = torch.tensor([(-8 + (j % 16)) * 0.5 for j in range(32)])
    q = quantize_rows(vals[None], "q4_0")
    assert torch.equal(q.rows()[0], vals)
    scale = q.data[0, :2].view(torch.float16).item()
    assert scale == 0.5
    # byte i: value i in the low nibble, value i + 16 in the high nibble (stored as q + 8)
    assert q.data[0, 2].item() == (0 | (0 << 4)) and q.data[0, 3].item() == (1 | (1 << 4))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_zero_rows_and_row_selection(fmt):
    m = torch.zeros(4, 64)
    m[2] = torch.linspace(-1, 1, 64)
    q = quantize_rows(m, fmt)
    assert torch.equal(q.rows()[0], torch.zeros(64))
    idx = torch.tensor([2, 0])
    assert torch.equal(q.rows(idx), q.rows()[idx])
    assert torch.equal(quantize_rows(q.rows(), fmt).data, q.data)   # on-grid values re-quantise exactly


def test_shapes_that_are_not_whole_blocks_are_refused():
    assert not quantizable(torch.zeros(3, 33), "q8_0") and not quantizable(torch.zeros(3, 64), "bf16")
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize_rows(torch.zeros(3, 33), "q4_0")


def test_tensor_like_reads_are_dequantised():
    q = quantize_rows(torch.randn(3, 32), "q8_0")
    assert isinstance(q, QuantRows) and q.float().dtype == torch.float32 and q.double().dtype == torch.float64
    assert torch.equal(q.to(torch.bfloat16), q.rows().bfloat16())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_transposed_rows_read_as_the_logical_matrix(fmt):
    from edgesparse.backends.formats import TransposedRows
    w_down = torch.randn(48, 96, generator=torch.Generator().manual_seed(4))   # [d, d_ff]
    q = quantize_rows(w_down, fmt)
    t = TransposedRows(q.fmt, q.data, q.cols)
    assert t.shape == (96, 48) and t.stored.shape == (48, 96)
    assert torch.equal(t.rows(), q.rows().T)
    idx = torch.tensor([0, 5, 95])
    assert torch.equal(t.rows(idx), q.rows().T[idx])


def test_prepare_ffn_lays_out_the_down_projection_per_executor_and_activation():
    """SwiGLU on the cpu keeps W_down's rows (TransposedRows); ReGLU (sparse kernels gather
    neuron rows) and executors without that kernel get a neuron-major copy, 8 bits where it
    crosses 4-bit blocks."""
    from edgesparse.backends.cpu import CpuExecutor
    from edgesparse.backends.formats import TransposedRows
    from edgesparse.backends.reference import TorchExecutor
    g = torch.Generator().manual_seed(5)
    gate, up, down = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g)
    class Reference(TorchExecutor):   # the torch ops alone: no row-major down kernel
        name = "reference"

        @classmethod
        def availability(cls):
            return True, "cpu"
    cpu, ref = CpuExecutor("cpu", "q4_0"), Reference("cpu", "q4_0")
    f = cpu.prepare_ffn(gate, up, down, "silu")
    assert isinstance(f.down_t, TransposedRows) and f.down_t.fmt == "q4_0"
    assert torch.equal(f.down_t.rows(), quantize_rows(down, "q4_0").rows().T)
    for ex, act in ((cpu, "relu"), (ref, "silu")):
        f = ex.prepare_ffn(gate, up, down, act)
        assert type(f.down_t) is QuantRows and f.down_t.shape == (64, 32)
    q = quantize_rows(down, "q4_0")   # as a GGUF file gives it
    f = ref.prepare_ffn(gate, up, TransposedRows(q.fmt, q.data, q.cols), "silu")
    assert type(f.down_t) is QuantRows and f.down_t.fmt == "q8_0"
    assert torch.allclose(f.down_t.rows(), q.rows().T, atol=0.02 * q.rows().abs().max().item())
