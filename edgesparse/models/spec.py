"""What edgesparse needs to know about a checkpoint's architecture, read from its HF config."""
from __future__ import annotations

from dataclasses import dataclass

from edgesparse.errors import UnsupportedModelError

from .families import Family, family_of_config

# FATReLU (ProSparse, MiniCPM-S): x where x > t, else 0, with t the config's hidden_act_param
ACTIVATIONS = {"relu": "relu", "fatrelu": "fatrelu", "silu": "silu", "swish": "silu"}
REGLU_ACTS = ("relu", "fatrelu")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    act: str
    tied: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None
    max_positions: int
    act_threshold: float = 0.0   # FATReLU's t (the gate is kept where it exceeds t); 0 for ReLU

    @property
    def is_reglu(self) -> bool:
        return self.act in REGLU_ACTS


def spec_from_config(config, family: Family | None = None) -> ModelSpec:
    """The decoder's spec: the Llama-layout settings every family shares, then the family's
    own rules (biases, sliding window, settings it refuses)."""
    family = family or family_of_config(config)
    act = ACTIVATIONS.get(getattr(config, "hidden_act", None))
    if act is None:
        raise UnsupportedModelError(f"unsupported FFN activation {getattr(config, 'hidden_act', None)!r}; "
                                    f"expected one of {', '.join(ACTIVATIONS)}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) == "dynamic":
        raise UnsupportedModelError("dynamic-NTK RoPE scaling is not supported (it changes with length)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("FFN biases (mlp_bias=True) are not supported")
    n_heads = config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    fields = dict(
        family=family.name, vocab_size=config.vocab_size, hidden=config.hidden_size,
        intermediate=config.intermediate_size, n_layers=config.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        eps=config.rms_norm_eps, act=act, tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=bias, o_bias=bias, sliding_window=None, max_positions=config.max_position_embeddings,
        act_threshold=_act_threshold(config, act))
    fields.update(family.rules(config))
    _check_sizes(fields)
    return ModelSpec(**fields)


def _act_threshold(config, act: str) -> float:
    """FATReLU's threshold, from the key the published configs use (``hidden_act_param``,
    e.g. 0.03 in MiniCPM-S-1B-sft); refused when missing or not a finite number >= 0."""
    if act != "fatrelu":
        return 0.0
    t = getattr(config, "hidden_act_param", None)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
        raise UnsupportedModelError(f"hidden_act fatrelu needs its threshold hidden_act_param, a number >= 0; "
                                    f"the config has {t!r}")
    return float(t)


# Upper bounds on a config's sizes, far above any published model: a crafted config must not
# make the loader allocate RoPE tables or caches of terabytes before a weight is read.
LIMITS = dict(vocab_size=1 << 22, hidden=1 << 16, intermediate=1 << 20, n_layers=1024, n_heads=1024,
              n_kv_heads=1024, head_dim=1024, max_positions=1 << 20)


def _check_sizes(f: dict) -> None:
    for key, hi in LIMITS.items():
        v = f[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise UnsupportedModelError(f"config {key} = {v!r}: expected an integer from 1 to {hi}")
    if f["n_heads"] % f["n_kv_heads"]:
        raise UnsupportedModelError(f"config has {f['n_heads']} attention heads, not a multiple of its "
                                    f"{f['n_kv_heads']} key/value heads")
    if f["head_dim"] % 2:
        raise UnsupportedModelError(f"config head_dim = {f['head_dim']}: RoPE needs an even head size")
    eps = f["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise UnsupportedModelError(f"config rms_norm_eps = {eps!r}: expected a number between 0 and 1")
    sw = f.get("sliding_window")
    if sw is not None and (isinstance(sw, bool) or not isinstance(sw, int) or sw < 1):
        raise UnsupportedModelError(f"config sliding_window = {sw!r}: expected a positive integer")


def checked_tensors(found: dict, names, spec: ModelSpec, kind: str, gguf_order: bool = False):
    """``(name, tensor)`` for every tensor of ``found`` the decoder reads, each present (where
    required) with the shape its config implies (``gguf_order``: dims columns first, as GGUF
    lists them); otherwise one-line ModelFilesError naming the ``kind`` of tensor."""
    from edgesparse.errors import ModelFilesError
    for name, (shape, required) in expected_shapes(names, spec).items():
        shape = tuple(reversed(shape)) if gguf_order else shape
        t = found.get(name)
        if t is None:
            if required:
                raise ModelFilesError(f"{kind} {name} is missing (the config implies {list(shape)})")
            continue
        if tuple(t.shape) != shape:
            raise ModelFilesError(f"{kind} {name} has shape {list(t.shape)}; the config implies {list(shape)}")
        yield name, t


def expected_shapes(names, spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Checkpoint name (``names``: a family's ``TensorNames``, HF or GGUF) -> (shape in HF
    order ``[out, in]``, required) for every tensor the decoder reads.  The loaders hold a
    checkpoint to it before any weight is used."""
    d, nq, nkv = spec.hidden, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    out = {names.embed: ((spec.vocab_size, d), True), names.norm: ((d,), True),
           names.lm_head: ((spec.vocab_size, d), False)}   # absent: tied to the embedding
    per_layer = {"attn_norm": (d,), "q": (nq, d), "k": (nkv, d), "v": (nkv, d), "o": (d, nq),
                 "mlp_norm": (d,), "gate": (spec.intermediate, d), "up": (spec.intermediate, d),
                 "down": (d, spec.intermediate)}
    biases = {"q": spec.qkv_bias, "k": spec.qkv_bias, "v": spec.qkv_bias, "o": spec.o_bias}
    for i in range(spec.n_layers):
        for field, shape in per_layer.items():
            name = getattr(names, field).format(i=i)
            out[name] = (shape, True)
            if biases.get(field):
                out[name.replace("weight", "bias")] = ((shape[0],), True)
    return out
