"""The terminal chat loop, driven with scripted input."""
import edgesparse
from edgesparse.apps.chat import chat_loop


def run(llm, lines):
    it = iter(lines)
    out = []

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError
    chat_loop(llm, max_new_tokens=8, temperature=0, read=read, write=out.append)
    return "".join(out)


def test_chat_turns_stats_reset_and_unknown_command(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    text = run(llm, ["/stats", "The quick brown fox", "/stats", "/reset", "/bogus", "hello again", "/quit"])
    assert "(no answer yet)" in text and "tokens/s" in text and "ffn_sparsity" in text
    assert "(conversation cleared)" in text and "unknown command /bogus" in text


def test_chat_ctrl_c_stops_answer_but_keeps_session(llama_relu, monkeypatch):
    llm = edgesparse.load(llama_relu, backend="cpu")
    real_stream = llm.stream

    def interrupted(*a, **k):
        gen = real_stream(*a, **k)
        yield next(gen)
        raise KeyboardInterrupt
    monkeypatch.setattr(llm, "stream", interrupted)
    text = run(llm, ["first question", "/stats", "/quit"])
    assert "[stopped]" in text and "finish: interrupted" in text
