"""Shared fixtures: tiny random Llama-family checkpoints written to disk like real ones."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run on the CPU through the interpreter (set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from edgesparse.eval.data import find_data_dir  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

DATA = find_data_dir()
TEXT = ("The quick brown fox jumps over the lazy dog. Sparse activations skip work. "
        "Edge devices decode tokens one at a time, so memory bandwidth is the limit. ") * 20
VOCAB = 384


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)


def make_config(family: str, act: str = "relu", **over):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, hidden_act=act, max_position_embeddings=256,
              tie_word_embeddings=family != "mistral", eos_token_id=0, bos_token_id=0)
    if family == "mistral":
        kw["sliding_window"] = 12   # short, so the window actually masks in the tests
    kw.update(over)
    return cls(**kw)


def make_checkpoint(out: Path, family: str = "llama", act: str = "relu", seed: int = 0,
                    dtype: torch.dtype = torch.float32, **over) -> Path:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = make_config(family, act, **over)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so every sublayer shapes the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.shape[0] != cfg.hidden_size:  # biases
                p.normal_(0, 0.05)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    make_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    cache = {}

    def get(family="llama", act="relu", seed=0, **over):
        key = (family, act, seed, repr(sorted(over.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{family}_{act}")
            cache[key] = make_checkpoint(d, family, act, seed, **over)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def llama_relu(ckpt_factory):
    return ckpt_factory("llama", "relu")


# -- child servers die with the test run -------------------------------------------------------
# Each server a test starts gets its own process group (its workers too), and every group still
# alive is killed when the run ends: at teardown, at exit, and on SIGTERM of pytest itself.
_CHILDREN: set = set()


def spawn(cmd, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    _CHILDREN.add(proc)
    return proc


def reap(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the child (SIGKILL to its whole group if it does not exit) and wait for it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
    _kill_group(proc)   # anything it started
    _CHILDREN.discard(proc)
    return proc.returncode


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_children(*_) -> None:
    for proc in list(_CHILDREN):
        _kill_group(proc)
    _CHILDREN.clear()


def pytest_configure(config):
    import atexit
    atexit.register(_kill_children)

    def on_sigterm(signum, frame):   # the children first, then die of the signal as before
        _kill_children()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_sigterm)


def pytest_unconfigure(config):
    _kill_children()
