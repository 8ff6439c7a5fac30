"""Next-token selection: min-p and the repetition penalty against hand-computed cases, and
their option checks."""
import pytest
import torch

import edgesparse
from edgesparse.errors import InvalidOptionError
from edgesparse.sampling import SamplingParams, sample


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5]])
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(logits, greedy, None).item() == 0
    # token 0 seen: 2.0 -> 1.0, so token 1 (1.5) wins; a seen negative logit only sinks further
    assert sample(logits, greedy, None, [[0, 2]]).item() == 1
    assert sample(logits, SamplingParams(temperature=0), None, [[0]]).item() == 0   # penalty 1: no change


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, min_p=0.4)   # keeps p >= 0.2: tokens 0 and 1
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, p, g).item() for _ in range(300)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("kw", [dict(min_p=-0.1), dict(min_p=1.5), dict(repetition_penalty=0), dict(repetition_penalty=11)])
def test_bad_values_are_option_errors(kw):
    with pytest.raises(InvalidOptionError):
        SamplingParams(**kw).validate()


def test_generate_with_a_repetition_penalty_repeats_less():
    llm = edgesparse.load("tiny", backend="cpu")
    prompt = "The history of the city"
    plain = llm.generate(prompt, max_new_tokens=40, stop_token_ids=[]).token_ids
    pen = llm.generate(prompt, max_new_tokens=40, stop_token_ids=[], repetition_penalty=1.5).token_ids
    assert len(set(pen)) > len(set(plain))


def _gen_config(tmp_path, body):
    (tmp_path / "generation_config.json").write_text(body if isinstance(body, str) else __import__("json").dumps(body))
    return tmp_path


def test_checkpoint_defaults_read_the_generation_config(tmp_path):
    from edgesparse.sampling import checkpoint_defaults
    assert checkpoint_defaults(tmp_path) == {} and checkpoint_defaults(None) == {}
    d = _gen_config(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                               "repetition_penalty": 1.05, "max_length": 99, "eos_token_id": 2})
    assert checkpoint_defaults(d) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    # transformers: do_sample false is greedy, whatever the temperature says
    _gen_config(tmp_path, {"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.2})
    assert checkpoint_defaults(tmp_path) == {"temperature": 0.0, "repetition_penalty": 1.2}


@pytest.mark.parametrize("body, needle", [("{not json", "not a readable generation config"),
                                          ("[1]", "not a JSON object"),
                                          ({"temperature": 500.0}, "temperature must be in")])
def test_a_broken_generation_config_is_a_model_files_error(tmp_path, body, needle):
    from edgesparse.errors import ModelFilesError
    from edgesparse.sampling import checkpoint_defaults
    with pytest.raises(ModelFilesError, match=needle):
        checkpoint_defaults(_gen_config(tmp_path, body))


def test_server_fields_left_out_take_the_checkpoint_defaults():
    pytest.importorskip("fastapi")
    from edgesparse.apps.serve.openai_api import parse_chat
    msgs = [{"role": "user", "content": "hi"}]
    p = parse_chat({"messages": msgs}, "m", {"temperature": 0.2, "top_k": 5, "min_p": 0.1}).params
    assert (p.temperature, p.top_k, p.min_p, p.top_p) == (0.2, 5, 0.1, 1.0)
    p = parse_chat({"messages": msgs, "temperature": 0.9, "top_k": -1}, "m", {"temperature": 0.2, "top_k": 5}).params
    assert (p.temperature, p.top_k) == (0.9, 0)
    assert parse_chat({"messages": msgs}, "m").params.temperature == 1.0   # OpenAI's default without a config


def test_generate_uses_the_checkpoint_defaults_unless_flags_say_otherwise(llama_relu, tmp_path, monkeypatch):
    """The CLI resolves flags > generation_config.json > greedy; the same seed and the same
    effective options give the same text."""
    import shutil
    from edgesparse.apps.cli import main
    d = tmp_path / "m"
    shutil.copytree(llama_relu, d)
    _gen_config(d, {"do_sample": True, "temperature": 1.5, "top_k": 50})
    run = lambda *extra: main(["generate", str(d), "--backend", "cpu", "--prompt", "a b", "--max-new-tokens", "8",  # noqa: E731
                               "--seed", "3", "--json", "--raw", *extra])
    outs = {}
    for key, extra in (("config", ()), ("flags", ("--temperature", "1.5", "--top-k", "50")), ("greedy", ("--temperature", "0"))):
        import io, contextlib, json   # noqa: E401
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert run(*extra) in (0, None)
        outs[key] = json.loads(buf.getvalue())["text"]
    assert outs["config"] == outs["flags"]
    greedy = edgesparse.load(d, backend="cpu").generate("a b", max_new_tokens=8, stop_token_ids=None).text
    assert outs["greedy"] == greedy
