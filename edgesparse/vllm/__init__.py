"""vLLM integration: a vLLM general plugin whose model classes run the FFNs of Llama, Mistral
and Qwen2 checkpoints on the edgesparse executor, fed by ``edgesparse calibrate`` artifacts.

vLLM calls ``register()`` in every process it starts (entry-point group
``vllm.general_plugins`` in pyproject.toml).  The classes are registered by their
"module:Class" names, so nothing here imports vLLM's model code (or a device API) until vLLM
builds a model.  Select one with ``--hf-overrides '{"architectures":
["EdgeSparseLlamaForCausalLM"], "edgesparse_artifacts": "/path"}'`` (docs/scale-out.md)."""
from __future__ import annotations

ARCHITECTURES = {
    "EdgeSparseLlamaForCausalLM": "edgesparse.vllm.model:EdgeSparseLlamaForCausalLM",
    "EdgeSparseMistralForCausalLM": "edgesparse.vllm.model:EdgeSparseMistralForCausalLM",
    "EdgeSparseQwen2ForCausalLM": "edgesparse.vllm.model:EdgeSparseQwen2ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry
    for arch, target in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
