"""The benchmark commands run and report what they claim (timings themselves are not asserted)."""
import json

import pytest

from edgesparse.benchmarks.ffn import bench_ffn, parse_shape
from edgesparse.apps.cli import main
from edgesparse.errors import InvalidOptionError


def test_bench_ffn_small_shape_json(capsys):
    assert main(["bench", "ffn", "--shape", "64x256", "--sparsity", "0.9", "--dtype", "fp32",
                 "--repeats", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("dense_ms", "sparse_ms", "exact_ms", "speedup", "touched_bytes", "bandwidth_gbs", "floor_ms"):
        assert k in out and out[k] > 0
    assert out["efficiency"] >= 0   # floor / measured: rounds to 0.0 for so small a layer on a busy machine
    assert out["active"] == round(0.1 * 256) and out["candidates"] > out["active"]
    assert out["touched_bytes"] < out["dense_bytes"]


@pytest.mark.parametrize("weights", ["q8_0", "q4_0"])
def test_bench_ffn_quantised_weights(capsys, weights):
    assert main(["bench", "ffn", "--shape", "64x256", "--sparsity", "0.9", "--weights", weights,
                 "--repeats", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == weights and out["dense_bytes"] == 3 * 256 * (64 // 32) * {"q8_0": 34, "q4_0": 18}[weights]


def test_bench_ffn_bad_options():
    with pytest.raises(InvalidOptionError):
        parse_shape("4096by11008")
    with pytest.raises(InvalidOptionError):
        bench_ffn("64x256", sparsity=1.5)


def test_gpu_ffn_bench_runs_its_kernels_under_the_interpreter():
    """The GPU benchmark's code path (cuda executor, Triton kernels) at a tiny shape on the CPU."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "bench/gpu_ffn.py", "--interpret-smoke", "--levels", "0.9"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [r["format"] for r in res["rows"]] == ["float", "q8_0", "q4_0", "q4_1"]   # every format
    for row in res["rows"]:
        assert row["backend"] == "cuda" and row["sparse_ms"] > 0 and row["weights"] in (row["format"], "fp32")
    # float: exactly the asked-for 10% active; blocks move the gate values a little
    assert res["rows"][0]["active"] == round(0.1 * 256)
    assert all(abs(r["active"] - round(0.1 * 256)) <= 12 for r in res["rows"][1:])


def test_bench_decode_reports_all_engines(llama_relu):
    from edgesparse.benchmarks.decode import bench_decode
    out = bench_decode(str(llama_relu), dtype="fp32", new_tokens=4, rounds=1)
    for k in ("hf_tok_s", "dense_tok_s", "ffn_sparse_tok_s", "full_sparse_tok_s"):
        assert out[k] > 0
    assert 0 < out["ffn_sparsity"] < 1 and abs(out["attn_sparsity"] - 0.4) < 0.05
    t = out["per_token"]   # weight bytes streamed vs the rest of each token
    assert t["dense"]["weight_mb"] > max(t["ffn_sparse"]["weight_mb"], t["full_sparse"]["weight_mb"])
    assert min(t["ffn_sparse"]["weight_mb"], t["full_sparse"]["weight_mb"]) > 0
    for k in t:
        assert t[k]["token_ms"] > t[k]["streaming_ms"] > 0 and 0 < t[k]["non_streaming_share"] < 1
    with pytest.raises(InvalidOptionError):
        bench_decode()


def test_weight_bytes_per_token_counts_what_a_step_reads():
    """Dense: every matrix once, plus the head and one embedding row; sparse: the kept shares."""
    import edgesparse
    from edgesparse.benchmarks.decode import weight_bytes_per_token
    m = edgesparse.load("tiny", backend="cpu", weights="q8_0").model
    mats = sum(l.attn.qkv.weight.nbytes + l.attn.o.weight.nbytes + l.mlp.ffn.gate.nbytes + l.mlp.ffn.up.nbytes
               + l.mlp.ffn.down_t.nbytes for l in m.layers)
    embed_row = m.embed.numel() * m.embed.element_size() // m.spec.vocab_size
    assert weight_bytes_per_token(m, "dense", False, {}) == mats + m.lm_head.weight.nbytes + embed_row
    half = weight_bytes_per_token(m, "exact", False, {"gate_sparsity": 0.0, "ffn_sparsity": 0.5})
    ffn = sum(l.mlp.ffn.up.nbytes + l.mlp.ffn.down_t.nbytes for l in m.layers)
    assert abs(half - (mats + m.lm_head.weight.nbytes + embed_row - ffn / 2)) <= len(m.layers)
