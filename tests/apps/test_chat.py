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


def test_chat_stats_report_the_topk_share_kept(ckpt_factory, tmp_path):
    """/stats says what sparsity is in use in every mode: under Top-K artifacts, the share of
    each site's input kept (no FFN row counts, which only ReGLU FFNs have)."""
    from conftest import TEXT
    ck = ckpt_factory("llama", "silu")
    data = tmp_path / "t.txt"
    data.write_text(TEXT * 4)
    edgesparse.calibrate(ck, tmp_path / "a", data=[data], backend="cpu", tokens=1024, window=128,
                         attn_sparsity=0.4, mlp_sparsity=0.4)
    llm = edgesparse.load(ck, backend="cpu", artifacts=tmp_path / "a")
    text = run(llm, ["The quick brown fox", "/stats", "/quit"])
    assert "topk_kept" in text and "qkv" in text and "gate_up" in text and "ffn_sparsity" not in text
