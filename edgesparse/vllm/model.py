"""vLLM model classes for the families edgesparse runs, with the FFN on the edgesparse executor.

Everything dense is vLLM's own: the Llama attention (QKV/o parallel linears, rotary, paged KV
cache and its attention backend), RMSNorm, embeddings, lm_head, logits processor and sampler.
Each decoder layer's MLP is an ``EdgeSparseMLP`` (``mlp.py``), whose weights are edgesparse's
``FFNWeights`` and whose arithmetic is ``edgesparse.backends.get_executor(<platform>)``'s.

Options come from the HF config, set with vLLM's ``--hf-overrides`` (docs/scale-out.md):

* ``edgesparse_artifacts``: an ``edgesparse calibrate`` dir.  Read with edgesparse's own
  reader and fingerprint check (``sparsity.attach_artifacts``), so artifacts of another model
  are refused with the same error as the own engine's.  Without it the model runs dense.
* ``edgesparse_ffn_mode``: ``predictor`` (default with artifacts: each layer as calibrated),
  ``exact`` (ReGLU, lossless) or ``dense`` (default without artifacts).
* ``edgesparse_union_break_even``: see ``mlp.UNION_BREAK_EVEN``.

The FFN's shapes depend on the data (which neurons fire), so the model is never traced:
torch.compile is off for it (``ignore_torch_compile``) and CUDA graphs must be off too
(``--enforce-eager``; checked below)."""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from edgesparse.backends import get_executor
from edgesparse.backends.interface import LinearWeights
from edgesparse.errors import ArtifactError, InvalidOptionError, UnsupportedModelError
from edgesparse.models.families import family_of
from edgesparse.models.spec import ModelSpec, spec_from_config
from edgesparse.models.weights import Attention, Layer, ReGLUMLP

from .mlp import UNION_BREAK_EVEN, EdgeSparseMLP, Runtime, StepPlan

logger = init_logger("vllm.edgesparse")

# vLLM's platform device type -> the edgesparse backend that runs on it (vllm-ascend: "npu").
BACKENDS = {"cpu": "cpu", "cuda": "cuda", "npu": "cann"}
LOG_EVERY_S = 30.0   # how often the batch-path counters are logged while requests run


def executor_for_platform():
    from vllm.platforms import current_platform
    kind = current_platform.device_type
    if kind not in BACKENDS:
        raise UnsupportedModelError(f"edgesparse has no executor for vLLM platform {kind!r}; "
                                    f"it runs on {', '.join(BACKENDS)}")
    return get_executor(BACKENDS[kind])


@dataclass
class _ModelView:
    """The parts of a ``DecoderModel`` that ``attach_artifacts`` (fingerprint, predictors)
    reads: the spec, executor, dtype and each layer's edgesparse weight types.  The tensors
    are vLLM's loaded parameters, not copies."""
    spec: ModelSpec
    ex: object
    layers: list
    dtype: torch.dtype


def step_plan(n_tokens: int) -> StepPlan:
    """Decode rows of this forward from vLLM's attention metadata: the rows of requests with
    one query token.  No metadata (profiling and warm-up runs): every row dense."""
    from vllm.forward_context import get_forward_context, is_forward_context_available
    if not is_forward_context_available():
        return StepPlan()
    md = get_forward_context().attn_metadata
    if not isinstance(md, dict) or not md:   # none, or micro-batches (list): dense
        return StepPlan()
    m = next(iter(md.values()))
    n_actual = getattr(m, "num_actual_tokens", n_tokens)
    if getattr(m, "max_query_len", None) == 1 and n_actual == n_tokens:
        return StepPlan(None, True)
    qsl = getattr(m, "query_start_loc", None)
    if qsl is None:
        return StepPlan()
    qsl = qsl.to("cpu", torch.long)
    starts = qsl[:-1][(qsl[1:] - qsl[:-1]) == 1]
    return StepPlan(starts[starts < n_actual].to(torch.long), False)


class EdgeSparseDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with the MLP replaced.  vLLM's ``LlamaMLP`` accepts only
    silu, so the parent is built from a config copy that says silu (its MLP is dropped at
    once); the activation that runs is the checkpoint's, in ``EdgeSparseMLP``."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", *, runtime: Runtime, spec: ModelSpec,
                 attn_config=None):
        cfg = copy.copy(attn_config or vllm_config.model_config.hf_config)
        cfg.hidden_act = "silu"
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=cfg)
        index = int(prefix.rsplit(".", 1)[-1])
        self.mlp = EdgeSparseMLP(spec.hidden, spec.intermediate, spec.act, index, runtime, spec.act_threshold)


@ignore_torch_compile
class EdgeSparseLlamaModel(LlamaModel):
    """vLLM's LlamaModel, never compiled (the FFN's shapes depend on the data)."""


class EdgeSparseLlamaForCausalLM(LlamaForCausalLM):
    """A Llama (ReGLU or SwiGLU) whose FFNs run on the edgesparse executor."""
    family_arch = "LlamaForCausalLM"   # the edgesparse family (models/families.py)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        spec = spec_from_config(config, family_of([self.family_arch]))   # refuses what edgesparse cannot run
        if get_tensor_model_parallel_world_size() > 1 or get_pp_group().world_size > 1:
            raise UnsupportedModelError("edgesparse's vLLM model runs on one device (tensor/pipeline "
                                        "parallel size 1); the FFN executor is single-device")
        artifacts = getattr(config, "edgesparse_artifacts", None)
        mode = getattr(config, "edgesparse_ffn_mode", None) or ("predictor" if artifacts else "dense")
        break_even = getattr(config, "edgesparse_union_break_even", None)
        rt = Runtime(executor_for_platform(), mode, UNION_BREAK_EVEN if break_even is None else break_even)
        if mode != "dense" and not spec.is_reglu:
            raise InvalidOptionError(f"ffn mode {mode!r} needs a ReGLU model (hidden_act=relu)")
        if mode == "predictor" and not artifacts:
            raise InvalidOptionError("ffn mode 'predictor' needs calibration artifacts (edgesparse_artifacts)")
        if mode != "dense" and vllm_config.compilation_config.cudagraph_mode not in (None, CUDAGraphMode.NONE):
            raise InvalidOptionError("the sparse FFN's shapes depend on the data: run vLLM with --enforce-eager")
        # Plain attributes before nn.Module.__init__ (which _init_model, called inside it, reads).
        for k, v in (("_es_spec", spec), ("_es_artifacts", artifacts), ("_es_runtime_init", rt)):
            object.__setattr__(self, k, v)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.runtime = rt
        self.arts = None
        self._last_log, self._logged = time.monotonic(), None

    def _attn_config(self, config):
        """The config vLLM's Llama attention is built from (families adjust biases here)."""
        return config

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=LlamaDecoderLayer):
        rt, spec = self._es_runtime_init, self._es_spec
        attn_config = self._attn_config(vllm_config.model_config.hf_config)
        layer = functools.partial(EdgeSparseDecoderLayer, runtime=rt, spec=spec, attn_config=attn_config)
        return EdgeSparseLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        n = positions.shape[-1]
        self.runtime.plan = step_plan(n)
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self._maybe_log()
        return out

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        self._finish_loading()
        return loaded

    def _finish_loading(self) -> None:
        """Weights into the executor's layouts, then the artifacts (checked, installed)."""
        rt, layers = self.runtime, []
        for layer in self.model.layers:
            layer.mlp.finish_loading(layer.post_attention_layernorm.weight.data)
            attn = layer.self_attn
            # Attention holds vLLM's own tensors: only the fingerprint reads its norm.
            layers.append(Layer(Attention(layer.input_layernorm.weight.data, LinearWeights(attn.qkv_proj.weight),
                                          LinearWeights(attn.o_proj.weight)), layer.mlp.es))
        view = _ModelView(self._es_spec, rt.ex, layers, self.model.norm.weight.dtype)
        if self._es_artifacts:
            from edgesparse.sparsity import attach_artifacts
            arts = attach_artifacts(view, self._es_artifacts, with_topk=False)
            if arts.manifest.get("topk"):
                raise ArtifactError(f"artifacts in {self._es_artifacts} hold Top-K projections, which the vLLM "
                                    "model does not run; calibrate without --attn-sparsity/--mlp-sparsity")
            self.arts = arts
        if rt.mode == "predictor" and any(l.mlp.predictor is None and l.mlp.calibrated_mode == "predictor"
                                          for l in layers if isinstance(l.mlp, ReGLUMLP)):
            raise ArtifactError(f"artifacts in {self._es_artifacts} hold no FFN predictors")
        logger.info("edgesparse: %d layers on the %s executor, ffn mode %s%s, union break-even %.2f",
                    len(layers), rt.ex.name, rt.mode,
                    f" (artifacts {self._es_artifacts})" if self._es_artifacts else "", rt.break_even)

    def edgesparse_stats(self) -> dict:
        """Batch-path counters and FFN sparsity so far (``LLM.apply_model`` reads it)."""
        rt = self.runtime
        return dict(mode=rt.mode, break_even=rt.break_even, executor=rt.ex.name,
                    paths=rt.counters.as_dict(), sparsity=rt.stats.summary())

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_S:
            return
        self._last_log = now
        c = self.runtime.counters.as_dict()
        if c != self._logged:
            self._logged = c
            logger.info("edgesparse FFN layer calls: %d one-token sparse, %d batch-union sparse, %d dense "
                        "fallback (union > %.2f of d_ff; mean union %s), %d with prompt rows (dense), %d dense "
                        "by mode; sparsity %s", c["single"], c["union"], c["fallback"], self.runtime.break_even,
                        c["mean_union_share"], c["prefill"], c["dense"], self.runtime.stats.summary())


def edgesparse_stats(model: nn.Module) -> dict:
    """For ``LLM.apply_model(edgesparse_stats)``: importable, so it pickles by reference."""
    return model.edgesparse_stats()


class EdgeSparseMistralForCausalLM(EdgeSparseLlamaForCausalLM):
    """Mistral: the Llama layers; vLLM's attention takes the sliding window from its cache
    config, as for vLLM's own Mistral class."""
    family_arch = "MistralForCausalLM"


class EdgeSparseQwen2ForCausalLM(EdgeSparseLlamaForCausalLM):
    """Qwen2: the Llama layers with q/k/v biases and no o_proj bias."""
    family_arch = "Qwen2ForCausalLM"

    def _attn_config(self, config):
        cfg = copy.copy(config)
        cfg.qkv_bias, cfg.attention_bias = True, False   # what LlamaDecoderLayer reads
        return cfg
