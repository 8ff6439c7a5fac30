"""The bytes-per-token cost model that picks a ReGLU layer's predictor rank and mode."""
import pytest

from edgesparse.predictors.cost import GATHER_COST, FFNShape, rank_grid


def test_rank_grid_spans_d16_to_d2_within_limits():
    assert rank_grid(256, 1024) == [16, 32, 48, 64, 96, 128]
    assert rank_grid(4096, 11008) == [256, 512, 768, 1024]   # capped: a larger SVD does not pay
    assert rank_grid(64, 24) == [16, 24]                    # never above d_ff, never below 16
    assert rank_grid(8, 8) == [8]


def test_bytes_of_each_mode():
    s = FFNShape(d=256, d_ff=1024, gate_row=512, up_row=512, down_row=512)   # bf16 rows
    assert s.dense() == 3 * 1024 * 512
    assert s.exact(0.0) == 1024 * 512 and s.exact(1.0) == pytest.approx(1024 * 512 * (1 + 2 * GATHER_COST))
    assert s.predictor_bytes(32) == 32 * (256 + 1024) + 4 * (32 + 1024)
    # a predictor that skips nothing costs more than exact mode; one that skips most, far less
    assert s.predictor(32, 1.0, 0.1) > s.exact(0.1)
    assert s.predictor(32, 0.15, 0.1) < 0.5 * s.exact(0.1)
    # exact mode loses to the dense FFN only when most neurons fire
    assert s.exact(0.9) > s.dense() > s.exact(0.5)
    # float factors cost their dtype's bytes
    assert FFNShape(256, 1024, 512, 512, 512, factor_bytes=2).predictor_bytes(32) > s.predictor_bytes(32)
