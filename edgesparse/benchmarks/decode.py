"""``edgesparse bench decode``: decode tokens/s of transformers.generate, the own dense engine,
FFN-sparse (SVD predictors) and FFN-sparse + Top-K attention, same prompt and length.

``--synthetic tinyllama-1.1b`` builds a ReGLU Llama with TinyLlama-1.1B's shape and random
weights.  Random weights have no natural activation sparsity (about half the gate
pre-activations are > 0), so the predictor thresholds are calibrated to skip 86% of gate rows,
which leaves ~90% of up/down rows skipped; the measured sparsities are reported."""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..errors import InvalidOptionError
from ..progress import progress

SYNTHETIC = {"tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                    max_position_embeddings=2048),
             # MiniCPM-S-1B-sft's dims (its scalings fold into the weights and change no byte read)
             "minicpm-s-1b": dict(hidden_size=1536, intermediate_size=3840, num_hidden_layers=52,
                                  num_attention_heads=24, num_key_value_heads=8, vocab_size=73440,
                                  max_position_embeddings=4096)}


def synthetic_model(name: str, backend: str, dtype, weights: str | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgesparse.backends import get_executor
    from ..loader import build_model
    if name not in SYNTHETIC:
        raise InvalidOptionError(f"unknown synthetic model {name!r}; choose {', '.join(SYNTHETIC)}")
    cfg = LlamaConfig(hidden_act="relu", tie_word_embeddings=False, **SYNTHETIC[name])
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).to(dtype).eval()
    sd = hf.state_dict()
    ex = get_executor(backend)
    ex.weight_format = weights
    model = build_model(cfg, sd, ex, dtype)
    if weights is not None:   # LaRoSA folds into the float values, then quantises once
        from ..models.families import family_of_config
        from ..models.source import FloatSource
        model.float_source = FloatSource(hf.state_dict().__getitem__, family_of_config(cfg).tensors)
    return hf, model, cfg


def _hf_tok_s(hf, ids, n):
    def run(k):
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0
    return (n - 1) / (run(n) - run(1))


def _engine_tok_s(engine, ids, n):
    from ..sampling import SamplingParams
    out = engine.generate_ids([ids], SamplingParams(max_new_tokens=n, stop_token_ids=[]))[0]
    return out.tokens_per_s


def bench_decode(model_path=None, synthetic=None, backend="cpu", dtype="bf16", prompt_tokens=32,
                 new_tokens=32, rounds=3, ffn_gate_sparsity=0.86, attn_sparsity=0.4, rotation="global",
                 weights: str | None = None, graph: bool = False) -> dict:
    from ..sparsity import apply_topk, attach_artifacts
    from ..sparsity.calibrate import calibrate_model
    from ..engine import Engine
    from ..loader import DTYPES, load_model
    if (model_path is None) == (synthetic is None):
        raise InvalidOptionError("give a MODEL or --synthetic NAME")
    tdtype = DTYPES[dtype]
    if graph:
        from edgesparse.backends import get_executor
        if not get_executor(backend).captures_graphs:
            raise InvalidOptionError(f"--graph needs a backend that captures device graphs (cuda), not {backend}")
    t0 = time.time()
    if synthetic:
        hf, model, cfg = synthetic_model(synthetic, backend, tdtype, weights)
        tok = _RandomTokenizer(cfg.vocab_size)
    else:
        from transformers import AutoModelForCausalLM
        model, tok, cfg, p = load_model(model_path, backend=backend, dtype=tdtype, weights=weights)
        hf = AutoModelForCausalLM.from_pretrained(p, dtype=tdtype).eval()
    if not model.spec.is_reglu:
        raise InvalidOptionError("bench decode measures FFN predictors: it needs a ReGLU model")
    # with --graph every engine row is measured twice: eager, then replaying the captured step
    variants = (False, True) if graph else (False,)
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/calib.txt"
        with open(data, "w") as fh:
            fh.write(tok.random_text(8192) if synthetic else open(_default_text()).read()[:400_000])
        t_cal = time.time()
        calibrate_model(model, tok, f"{tmp}/arts", data=[data], tokens=4096, window=256,
                        target_sparsity=ffn_gate_sparsity if synthetic else None,
                        attn_sparsity=attn_sparsity, rotation=rotation)
        calibrate_s = round(time.time() - t_cal, 1)
        # FFN-sparse is measured first, then Top-K attention is installed on the same model.
        arts = attach_artifacts(model, f"{tmp}/arts", with_topk=False)
        setup_s = round(time.time() - t0, 1)
        engine = Engine(model, tok)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(10, cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
        res = {"hf": []}
        nbytes = {}

        def engine_rows(name, mode):
            model.set_ffn_mode(mode)
            for graphed in variants:
                model.graph_decode = graphed
                res.setdefault(name + ("_graph" if graphed else ""), []).append(_engine_tok_s(engine, ids, new_tokens))
            model.graph_decode = False

        with torch.inference_mode():
            for _ in progress(range(rounds), desc="decode rounds"):
                res["hf"].append(_hf_tok_s(hf, torch.tensor([ids]), new_tokens))
                engine_rows("dense", "dense")
                model.stats.reset()
                engine_rows("ffn_sparse", "predictor")
            ffn_stats = model.stats.summary()
            nbytes["dense"] = weight_bytes_per_token(model, "dense", False, {})
            nbytes["ffn_sparse"] = weight_bytes_per_token(model, "predictor", False, ffn_stats)
            apply_topk(model, arts)
            model.stats.reset()
            for _ in range(rounds):
                engine_rows("full_sparse", "predictor")
            nbytes["full_sparse"] = weight_bytes_per_token(model, "predictor", True, model.stats.summary())
    med = {k: statistics.median(v) for k, v in res.items()}
    from .ffn import read_bandwidth_gbs
    bw = read_bandwidth_gbs(model.ex, 1024)
    arts_topk = arts.manifest["topk"]
    ks = arts_topk["k"]
    spec = model.spec
    nq, nkv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    attn_sp = 1 - (ks["qkv"] * (nq + 2 * nkv) + ks["o"] * spec.hidden) / (spec.hidden * (nq + 2 * nkv) + nq * spec.hidden)
    hf = med["hf"]
    return dict(model=synthetic or str(model_path), backend=model.ex.name, dtype=dtype, weights=weights or dtype,
                threads=torch.get_num_threads(), bandwidth_gbs=round(bw, 2),
                prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds,
                hf_tok_s=round(hf, 3), dense_tok_s=round(med["dense"], 3),
                ffn_sparse_tok_s=round(med["ffn_sparse"], 3), full_sparse_tok_s=round(med["full_sparse"], 3),
                speedup_vs_dense=round(med["full_sparse"] / med["dense"], 3),
                speedup_vs_hf=round(med["full_sparse"] / hf, 3),
                ffn_speedup_vs_dense=round(med["ffn_sparse"] / med["dense"], 3),
                dense_vs_hf=round(med["dense"] / hf, 3),
                graph=({k: round(med[k], 3) for k in med if k.endswith("_graph")} |
                       {"speedup_vs_eager_dense": round(med["full_sparse_graph"] / med["dense"], 3),
                        "speedup_vs_graph_dense": round(med["full_sparse_graph"] / med["dense_graph"], 3)}
                       if graph else None),
                ffn_sparsity=round(ffn_stats["ffn_sparsity"], 4), gate_sparsity=round(ffn_stats["gate_sparsity"], 4),
                attn_sparsity=round(attn_sp, 4), topk=arts_topk, setup_s=setup_s, calibrate_s=calibrate_s,
                per_token={k: _breakdown(med[k], nbytes[k], bw) for k in nbytes},
                note=("synthetic random weights: thresholds set the sparsity (no natural sparsity)"
                      if synthetic else None), raw=res)


def _nbytes(t) -> int:
    return 0 if t is None else t.nbytes   # tensors and QuantRows alike


def _predictor_bytes(p) -> int:
    """The bytes a predictor's scores read: the int8 rows where the backend packed them, else
    the matrices it keeps (fp32 copies on cpu with block weights, or a and b)."""
    if p is None:
        return 0
    if p.packed:
        qa, _, qb, _ = p.packed
        if qa is not None and qb is not None:
            return _nbytes(qa) + _nbytes(qb)
    if p.fp32:
        return sum(_nbytes(t) for t in p.fp32[:2])
    return _nbytes(p.a) + _nbytes(p.b)


def weight_bytes_per_token(model, ffn_mode: str, topk: bool, stats: dict) -> int:
    """The weight bytes one decode step streams: every matrix a dense step reads, less what a
    sparse step skips (Top-K: k of each Top-K matrix's input rows; FFN: the gate rows and the
    up/down rows the measured sparsities skip, plus the predictor), plus the lm_head and one
    embedding row.  ``stats``: the sparse layers' pooled summary; a layer calibration left
    dense (``ReGLUMLP.calibrated_mode``) reads its whole FFN."""
    from ..models.weights import ReGLUMLP, TopKAttention
    total = _nbytes(model.lm_head.weight) + _nbytes(model.embed) // model.spec.vocab_size
    gate_keep = 1 - stats.get("gate_sparsity", 0.0)
    row_keep = 1 - stats.get("ffn_sparsity", 0.0)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        if isinstance(attn, TopKAttention):
            for w in (attn.qkv, attn.o):
                rows = w.weight_t.shape[0]
                total += _nbytes(w.weight_t) * (min(w.k, rows) / rows if topk else 1)
        else:
            total += _nbytes(attn.qkv.weight) + _nbytes(attn.o.weight)
        f = mlp.ffn
        if (mlp.effective_mode(ffn_mode) if isinstance(mlp, ReGLUMLP) else ffn_mode) == "dense":
            total += _nbytes(f.gate) + _nbytes(f.up) + _nbytes(f.down_t)
        else:
            total += _nbytes(f.gate) * gate_keep + (_nbytes(f.up) + _nbytes(f.down_t)) * row_keep
            total += _predictor_bytes(getattr(mlp, "predictor", None))
    return int(total)


def _breakdown(tok_s: float, nbytes: int, bw_gbs: float) -> dict:
    """Per-token time against the time its weight bytes take at the measured read bandwidth."""
    token_ms, floor_ms = 1000 / tok_s, nbytes / bw_gbs / 1e6
    # 4 decimals: a small model's floor at a quiet VM's bandwidth is a few µs (2 rounded it to 0)
    return dict(weight_mb=round(nbytes / 1e6, 3), token_ms=round(token_ms, 4), streaming_ms=round(floor_ms, 4),
                non_streaming_share=round(1 - floor_ms / token_ms, 3))


def _default_text():
    from ..sparsity.calibrate import default_data
    return default_data()[0]


class _RandomTokenizer:
    """Stand-in tokenizer for the synthetic model: text is space-separated token ids."""

    def __init__(self, vocab):
        self.vocab, self.eos_token_id = vocab, 0

    def random_text(self, n):
        g = torch.Generator().manual_seed(2)
        return " ".join(map(str, torch.randint(10, self.vocab, (n,), generator=g).tolist()))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))
