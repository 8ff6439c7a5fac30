"""The Python API: ``edgesparse.load`` returns an ``LLM`` that generates, streams and reports."""
from __future__ import annotations

from pathlib import Path

from .engine import Completion, Engine
from .loader import load_model
from .sampling import SamplingParams, checkpoint_defaults


class LLM:
    """A loaded model with its tokenizer, engine and (optional) calibration artifacts."""

    def __init__(self, model, tokenizer, config, path: Path, artifacts=None):
        self.model, self.tokenizer, self.config, self.path = model, tokenizer, config, path
        self.engine = Engine(model, tokenizer)
        self.artifacts = artifacts

    @property
    def sampling_defaults(self) -> dict:
        """The checkpoint's own sampling defaults (its generation_config.json; {} for a GGUF file
        or a checkpoint without one): what `generate`, `chat` and the server use for every
        field the caller leaves out."""
        if not hasattr(self, "_sampling_defaults"):
            self._sampling_defaults = checkpoint_defaults(self.path if self.path.is_dir() else None)
        return self._sampling_defaults

    @property
    def backend(self) -> str:
        return self.model.ex.name

    @property
    def name(self) -> str:
        return self.path.stem if self.path.suffix == ".gguf" else self.path.name

    def set_ffn_mode(self, mode: str) -> None:
        """``dense``, ``exact`` (ReGLU, lossless) or ``predictor`` (needs artifacts)."""
        self.model.set_ffn_mode(mode)

    def set_graph_decode(self, on: bool = True) -> None:
        """Decode one sequence by replaying a captured device graph of the whole step
        (``models/static_step.py``): on ``cuda``, where each token otherwise pays a launch per
        kernel from Python.  Backends that cannot capture refuse it."""
        from .errors import InvalidOptionError
        if on and not self.model.ex.captures_graphs:
            raise InvalidOptionError(f"graph decode needs a backend that captures device graphs (cuda); "
                                     f"this model runs on {self.backend}")
        self.model.graph_decode = bool(on)

    def generate(self, prompts, **kw) -> Completion | list[Completion]:
        return self.engine.generate(prompts, SamplingParams(**kw))

    def stream(self, prompt: str, on_finish=None, **kw):
        """Yield text pieces; ``on_finish`` receives ``{finish_reason, completion_tokens}``."""
        return self.engine.stream(prompt, SamplingParams(**kw), on_finish=on_finish)

    def chat_prompt(self, messages: list[dict], tokenizer=None) -> str:
        """Render chat messages with the tokenizer's chat template (``tokenizer``: a copy of
        this model's, for a caller on another thread)."""
        from .errors import InvalidOptionError
        tok = tokenizer or self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidOptionError(f"model {self.name} has no chat template; use plain completions")
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_stop_ids(self) -> list[int]:
        """EOS plus the end-of-turn tokens of common chat templates present in the vocabulary."""
        ids = list(self.engine.eos_ids)
        vocab = self.tokenizer.get_vocab()
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            if t in vocab and vocab[t] not in ids:
                ids.append(vocab[t])
        return ids


def load(path, backend: str = "auto", dtype=None, artifacts=None, weights: str | None = None) -> LLM:
    """Load a HF checkpoint dir, a ``.gguf`` file or ``"tiny"`` onto ``backend``; ``weights``
    ``q8_0`` / ``q4_0`` quantises the weight matrices at load (see ``loader.load_model``).

    With ``artifacts`` (a dir written by ``calibrate``) the FFNs decode in predictor mode (each
    layer as calibration chose: its predictor, or exact, or dense);
    a ReGLU model without artifacts decodes in exact-sparse mode; others decode densely."""
    model, tok, config, p = load_model(path, backend=backend, dtype=dtype, weights=weights)
    arts = None
    if artifacts is not None:
        from .sparsity import attach_artifacts
        arts = attach_artifacts(model, artifacts)
    llm = LLM(model, tok, config, p, arts)
    if arts is not None and arts.has_ffn_calibration:
        llm.set_ffn_mode("predictor")
    elif model.spec.is_reglu:
        llm.set_ffn_mode("exact")
    return llm
