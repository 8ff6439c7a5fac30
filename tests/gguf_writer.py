"""Write a Hugging Face Llama-layout checkpoint dir (safetensors, tokenizer.json BPE) to a GGUF
file the way llama.cpp's converter lays it out: ``llama`` metadata, a ``gpt2`` BPE tokenizer,
q/k rows permuted for llama.cpp's RoPE, matrices in one ggml type, vectors in F32.  Test
helper: seeds for the fuzz suite and GGUF round trips of the project's own small models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> llama.cpp's (interleaved RoPE pairs), as its converter does."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ckpt: Path, out: Path, qtype: str = "Q8_0", head_qtype: str | None = None) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.numpy import load_file
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    w = GGUFWriter(str(out), "llama")
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"]: a["id"] for a in tok.get("added_tokens", ())}
    pad = cfg["vocab_size"] - len(tokens)   # the embedding's rows past the tokenizer's: padding, as llama.cpp writes it
    tokens += [f"[PAD{i}]" for i in range(pad)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 5 if t.startswith("[PAD") else 1 for t in tokens])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    eos = cfg.get("eos_token_id", 0)
    w.add_bos_token_id(cfg.get("bos_token_id", eos))
    w.add_eos_token_id(eos)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in per.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{g}.{kind}"
    if cfg.get("tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    for hf_name, arr in sd.items():
        name = names[hf_name]
        if ".attn_q." in name:
            arr = _permute(arr, n_head)
        elif ".attn_k." in name:
            arr = _permute(arr, n_kv)
        typ = head_qtype if name in ("token_embd.weight", "output.weight") and head_qtype else qtype
        if arr.ndim == 1 or typ == "F32":
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            q = GGMLQuantizationType[typ]
            w.add_tensor(name, quantize(np.ascontiguousarray(arr), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
