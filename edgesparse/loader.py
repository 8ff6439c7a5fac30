"""Load a checkpoint (HF dir, ``.gguf`` file, or the embedded name ``tiny``) into a DecoderModel.

transformers supplies the config, the tokenizer, the RoPE tables and GGUF de-quantisation;
safetensors supplies the weights of HF checkpoint dirs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from edgesparse.backends import get_executor
from edgesparse.backends.interface import Executor
from .errors import EdgeSparseError, InvalidOptionError, ModelFilesError, UnsupportedModelError
from .models.decoder import DecoderModel
from .models.families import Family, family_of, family_of_config
from .models.spec import checked_tensors, spec_from_config, ModelSpec
from .models.weights import Attention, Layer, gated_mlp
from edgesparse.backends.formats import BLOCK_FORMATS, FLOAT_FORMATS, WEIGHT_FORMATS, QuantRows, cat_rows
from .embedded import TINY

EMBEDDED = {"tiny": TINY}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_model_path(path: str | Path) -> Path:
    if str(path) in EMBEDDED:
        return EMBEDDED[str(path)]
    p = Path(path).expanduser()
    if not p.exists():
        from .hub import fetch, is_hub_id
        if isinstance(path, str) and is_hub_id(path):
            return fetch(path)
        raise ModelFilesError(f"model not found: {path} (give a checkpoint dir, a .gguf file, a Hugging Face "
                              "hub id org/name, or 'tiny')")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelFilesError(f"{p} has no config.json: not a Hugging Face checkpoint dir")
        if not list(p.glob("*.safetensors")):
            raise ModelFilesError(f"{p} has no *.safetensors weights")
    elif p.suffix != ".gguf":
        raise ModelFilesError(f"{p} is neither a checkpoint dir nor a .gguf file")
    return p


def checkpoint_dtype(config, p: Path, ex: Executor) -> torch.dtype:
    """The precision a checkpoint is stored in, as transformers loads it with ``dtype="auto"``:
    the config's ``dtype`` (bf16 for most hub checkpoints), else fp32.  A GGUF file's blocks are
    its precision; its activations stay fp32 as llama.cpp's do.  fp16 becomes bf16 on the cpu
    backend, as vLLM's cpu backend does: the native kernels and the CPU's float units are bf16
    or fp32, and fp16's range overflows where bf16's does not."""
    if p.suffix == ".gguf":
        return torch.float32
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = DTYPES.get(str(name).replace("torch.", ""), torch.float32)
    if dtype == torch.float16 and ex.device.type == "cpu":
        return torch.bfloat16
    return dtype


def load_config(p: Path, reader=None):
    """``reader``: the GGUF file's already opened tensor table (``gguf_file.open_gguf``)."""
    try:
        if p.is_dir():
            from transformers import AutoConfig
            raw = json.loads((p / "config.json").read_text())
            if not isinstance(raw, dict):
                raise ValueError("config.json is not a JSON object")
            family = family_of(raw.get("architectures"), raw.get("model_type"))   # refuse before transformers parses it
            if family.plain_config:
                from transformers.configuration_utils import PretrainedConfig
                # remote code is never run; model_type names a class transformers lacks
                raw = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type")}
                return PretrainedConfig(**raw)
            return AutoConfig.from_pretrained(p, trust_remote_code=False)
        return _from_gguf(p, "config", reader)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        if isinstance(e, EdgeSparseError):
            raise
        raise ModelFilesError(f"cannot read the config of {p}: {(str(e).splitlines() or [type(e).__name__])[0]}") from e


def load_tokenizer(p: Path, reader=None):
    from transformers import AutoTokenizer
    try:
        if p.is_dir():
            return AutoTokenizer.from_pretrained(p, trust_remote_code=False)   # never asks, never runs it
        return _from_gguf(p, "tokenizer", reader)
    except (OSError, ValueError) as e:
        if isinstance(e, EdgeSparseError):
            raise
        raise ModelFilesError(f"cannot load the tokenizer of {p}: {(str(e).splitlines() or [type(e).__name__])[0]}") from e


def _from_gguf(p: Path, kind: str, reader=None):
    """transformers' config or tokenizer of a GGUF file, derived once and then read from the
    cache (deriving them parses the whole file in Python: ~4 s each for SmolLM2's 98 MB).  The
    cache is keyed on content: the metadata section's bytes and the tensor names (what the
    derivation reads), never on the path or the file's time stamps, so an edited file is
    never served another file's config.  The header is parsed strictly first
    (``gguf_header``): transformers' own parser only ever sees a well-formed file."""
    import shutil
    import tempfile
    from .cache import cache_dir
    from .gguf_file import open_gguf
    header = (reader or open_gguf(p)).header
    key = f"{header.metadata_sha256[:16]}-{header.names_sha256[:8]}"
    cached = cache_dir() / "gguf" / key / kind
    if kind == "config" and (cached / FULL_CONFIG).exists():
        return _light_config(cached / FULL_CONFIG)
    # imported only here: each pulls in its part of transformers (the config's, ~1 s)
    if kind == "config":
        from transformers import AutoConfig as auto
        marker = "config.json"
    else:
        from transformers import AutoTokenizer as auto
        marker = "tokenizer_config.json"
    if (cached / marker).exists():
        obj = auto.from_pretrained(cached)
        if kind == "config":   # a cache from before the full copy: add it (best effort)
            try:
                _save_full_config(obj, cached)
            except OSError:
                pass
        return obj
    try:
        obj = auto.from_pretrained(p.parent, gguf_file=p.name)
    except Exception as e:   # noqa: BLE001  transformers' parser over an untrusted file: any failure is the file's
        first = (str(e).splitlines() or [""])[0][:200]
        raise ModelFilesError(f"cannot derive the {kind} of GGUF {p}: {type(e).__name__}: {first}") from None
    tmp = None
    try:   # atomic: a concurrent loader sees the whole dir or none
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cached.parent)
        obj.save_pretrained(tmp)
        if kind == "config":
            _save_full_config(obj, Path(tmp))
        os.replace(tmp, cached)
    except OSError:   # a read-only cache (or a concurrent writer that won) is not an error
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return obj


# Every attribute of the derived config (to_dict, not save_pretrained's diff against the class
# defaults), so a later load can rebuild it as a plain PretrainedConfig: importing the family's
# config class pulls in transformers' model-loading modules, ~1 s of a ~2 s cold load.
FULL_CONFIG = "edgesparse-full-config.json"


def _save_full_config(config, folder: Path) -> None:
    """``FULL_CONFIG`` in ``folder``, written whole or not at all (a temporary file renamed)."""
    tmp = folder / f".{FULL_CONFIG}.{os.getpid()}"
    tmp.write_text(json.dumps(config.to_dict()))
    os.replace(tmp, folder / FULL_CONFIG)


def _light_config(path: Path):
    from transformers.configuration_utils import PretrainedConfig
    return PretrainedConfig(**json.loads(path.read_text()))


def load_state_dict(p: Path) -> dict[str, torch.Tensor]:
    """The float weights of a HF checkpoint dir (GGUF files: ``gguf_file.read_weights``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    sd = {}
    try:
        for f in sorted(p.glob("*.safetensors")):
            sd.update(load_file(f))
    except (SafetensorError, OSError) as e:
        raise ModelFilesError(f"corrupted weights in {p}: {e}") from e
    return sd


def check_state_dict(sd: dict, family: Family, spec: ModelSpec) -> None:
    """Every weight the decoder reads is present, floating point, with the shape its config
    implies (HF order: ``[out, in]``), before any of it is used."""
    for name, t in checked_tensors(sd, family.tensors, spec, "weight"):
        if not t.is_floating_point():
            raise ModelFilesError(f"weight {name} has dtype {t.dtype}; expected a floating-point type")


def rope_tables(config, spec: ModelSpec, dtype):
    """cos/sin for every position, computed as transformers' rotary embeddings do: the default
    inverse frequencies, or transformers' own initialiser for a scaled ``rope_type`` (linear,
    yarn, llama3, longrope, ...).  Only ``modeling_rope_utils`` is imported: the families'
    modeling modules would add ~190 MB of resident memory for one table."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
        scale = 1.0
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    if not torch.isfinite(inv_freq).all() or not (inv_freq > 0).all():
        raise UnsupportedModelError(f"config RoPE parameters give non-finite frequencies ({kind}, theta "
                                    f"{params.get('rope_theta', getattr(config, 'rope_theta', None))!r})")
    freqs = torch.arange(spec.max_positions).float()[:, None] * inv_freq.float()[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def build_model(config, sd: dict, ex: Executor, dtype, family: Family | None = None) -> DecoderModel:
    """A DecoderModel from a state dict named as the family's ``TensorNames`` say.  Values are
    float tensors, or QuantRows already in the runtime layout (from a GGUF file; a QuantRows
    down projection is neuron-major)."""
    family = family or family_of_config(config)
    spec = spec_from_config(config, family)
    names = family.tensors

    def w(name, required=True):   # popped: each checkpoint tensor is freed once placed
        t = sd.pop(name, None)
        if t is None and required:
            raise ModelFilesError(f"weight {name} missing from the checkpoint")
        if t is not None and family.fold is not None:
            t = family.fold(name, t, config, spec)
        return t if t is None or isinstance(t, QuantRows) else t.to(dtype)

    def bias(template, i, present):
        return w(template.format(i=i).replace("weight", "bias")) if present else None

    layers = []
    for i in range(spec.n_layers):
        n = lambda template: template.format(i=i)  # noqa: E731
        qkv_w = cat_rows([w(n(names.q)), w(n(names.k)), w(n(names.v))])
        qkv_b = None
        if spec.qkv_bias:
            qkv_b = torch.cat([bias(t, i, True) for t in (names.q, names.k, names.v)])
        attn = Attention(norm=ex.place(w(n(names.attn_norm))), qkv=ex.prepare_linear(qkv_w, qkv_b),
                         o=ex.prepare_linear(w(n(names.o)), bias(names.o, i, spec.o_bias)))
        mlp = gated_mlp(ex, ex.place(w(n(names.mlp_norm))), w(n(names.gate)), w(n(names.up)), w(n(names.down)),
                        spec.act, spec.act_threshold)
        layers.append(Layer(attn, mlp))
    embed = ex.place_matrix(w(names.embed), fmt=False)   # QuantRows stay blocks; float stays float
    head = embed if spec.tied or names.lm_head not in sd else ex.place_matrix(w(names.lm_head), fmt=False)
    cos, sin = rope_tables(config, spec, dtype)
    return DecoderModel(spec=spec, ex=ex, embed=embed, layers=layers, norm=ex.place(w(names.norm)),
                        lm_head=ex.prepare_linear(head, fmt=HEAD_FORMAT.get(ex.weight_format)),
                        cos=ex.place(cos), sin=ex.place(sin))


# Under block formats the lm_head is 8-bit: it decides every sampled token and is one matrix
# (llama.cpp keeps it at 6 bits in its Q4_0 files for the same reason).
HEAD_FORMAT = {fmt: "q8_0" for fmt in BLOCK_FORMATS}


def load_model(path, backend: str = "auto", dtype=None, weights: str | None = None):
    """Returns ``(model, tokenizer, config, resolved_path)``.

    ``weights``: None keeps the checkpoint's own precision (safetensors: ``dtype``; a GGUF file:
    its blocks: Q8_0 / Q4_0 / Q4_1 as they are, other 8-6-5-bit types as q8_0, 4-bit and below as
    q4_0); ``q8_0`` / ``q4_0`` / ``q4_1`` quantise the
    matrices at load, tensor by tensor; ``fp32`` / ``bf16`` / ``fp16`` keep float matrices.
    Activations, norms and the KV cache are in ``dtype``; None: the checkpoint's own
    (``checkpoint_dtype``)."""
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise InvalidOptionError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidOptionError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    if weights in FLOAT_FORMATS:
        dtype = dtype or DTYPES[weights]
    p = resolve_model_path(path)
    ex = get_executor(backend)
    reader = None
    if p.suffix == ".gguf":   # the file's structure, strictly, before transformers parses its metadata
        from .gguf_file import open_gguf
        reader = open_gguf(p)
    config = load_config(p, reader)
    dtype = dtype or checkpoint_dtype(config, p, ex)
    family = family_of_config(config)
    spec = spec_from_config(config, family)   # refuse an unsupported config before reading weights
    if p.suffix == ".gguf":
        from .gguf_file import check_tensors, default_format, read_weights
        check_tensors(reader, family, spec)   # every tensor against the config, before any is read
        tok = load_tokenizer(p, reader)
        fmt = default_format(reader) if weights is None else (None if weights in FLOAT_FORMATS else weights)
        sd = read_weights(reader, family, spec, fmt, HEAD_FORMAT.get(fmt), dtype)
    else:
        tok = load_tokenizer(p)
        fmt = weights if weights in BLOCK_FORMATS else None
        sd = load_state_dict(p)
        check_state_dict(sd, family, spec)
    ex.weight_format = fmt
    model = build_model(config, sd, ex, dtype, family)
    if fmt is not None and p.suffix != ".gguf":   # blocks made from float: keep a way back to them
        from .models.source import FloatSource
        model.float_source = FloatSource.from_safetensors(sorted(p.glob("*.safetensors")), family.tensors)
        if family.fold is not None:   # read back as the decoder holds them
            raw = model.float_source.get
            model.float_source.get = lambda name: family.fold(name, raw(name), config, spec)
    return model, tok, config, p
