"""Continuous batching (``edgesparse/batching.py``): sequences that join and leave the batch
between steps decode the same tokens as each one alone, in every weight format and mode."""
import pytest
import torch

import edgesparse
from edgesparse.batching import BatchDecoder
from edgesparse.errors import EmptyDataError, InvalidOptionError
from edgesparse.sampling import SamplingParams

PROMPTS = ["The history of the city", "In 1990 the band", "The river flows", "A new species of",
           "The king said", "Python is a", "Edge", "Sparse activations skip rows"]


def _run(dec, jobs):
    """Admit ``(prompt_ids, params)`` jobs as rows free up, step until all finish."""
    queue, out, owner = list(enumerate(jobs)), {}, {}
    while queue or any(s is not None for s in dec.seqs):
        while queue and dec.free():
            j, (ids, p) = queue.pop(0)
            owner[dec.admit(ids, p)] = j
        dec.step()
        for slot, s in enumerate(dec.seqs):
            if s is not None and s.finished:
                out[owner[slot]] = s.row.ids
                dec.release(slot)
    return [out[j] for j in range(len(jobs))]


@pytest.fixture(scope="module")
def tiny():
    from edgesparse.embedded import TINY_ARTIFACTS
    return edgesparse.load("tiny", backend="cpu", artifacts=TINY_ARTIFACTS)


def _staggered_equal_alone(llm, strategies=("rows", None)):
    """Forced batched steps (``rows``: every step of 2-3 rows is ``decode_rows``) and the
    measured choice (its probe alternates ``rows`` and ``each``) both give the alone tokens."""
    eng = llm.engine
    lengths = [5, 12, 9, 16, 7, 10, 14, 6]   # different finishing times
    jobs = [(eng.encode(x), SamplingParams(max_new_tokens=n, stop_token_ids=[])) for x, n in zip(PROMPTS, lengths)]
    alone = [eng.generate_ids([ids], p)[0].token_ids for ids, p in jobs]
    for strategy in strategies:
        dec = BatchDecoder(eng, 3, strategy)
        assert _run(dec, jobs) == alone
        assert dec.free() == 3


# the shipped predictors are fitted to float weights: block formats run the calibration-free modes
@pytest.mark.parametrize("weights,mode", [(None, "dense"), (None, "exact"), (None, "predictor"), ("q8_0", "dense"),
                                          ("q8_0", "exact"), ("q4_0", "dense"), ("q4_0", "exact"), ("q4_1", "exact")])
def test_staggered_sequences_equal_each_alone(weights, mode):
    """8 greedy sequences of different lengths through 3 rows give each sequence's tokens
    decoded alone on the single-sequence path (the native layer step)."""
    from edgesparse.embedded import TINY_ARTIFACTS
    llm = edgesparse.load("tiny", backend="cpu", weights=weights, artifacts=None if weights else TINY_ARTIFACTS)
    llm.model.set_ffn_mode(mode)
    _staggered_equal_alone(llm)


def test_topk_swiglu_model_equals_alone(ckpt_factory, tmp_path):
    """Rotated Top-K attention and MLP with residual adapters, q4_0 (a Qwen2-style SwiGLU)."""
    from conftest import TEXT
    path = ckpt_factory("llama", "silu", intermediate_size=176)
    data = tmp_path / "calib.txt"
    data.write_text(TEXT * 20)
    arts = edgesparse.calibrate(path, tmp_path / "a", data=[data], backend="cpu", tokens=512, window=64,
                                weights="q4_0", attn_sparsity=0.4, mlp_sparsity=0.4)["artifacts"]
    llm = edgesparse.load(path, backend="cpu", weights="q4_0", artifacts=arts)
    assert llm.model.ffn_mode == "topk"
    _staggered_equal_alone(llm)


def test_rows_step_equals_single_steps_bit_for_bit():
    """``decode_rows`` of three sequences: each row's logits are the one-token path's (composed
    ops), and the caches hold what single steps write."""
    llm = edgesparse.load("tiny", backend="cpu", weights="q4_0")
    m = llm.model
    m.fused_decode = False
    prompts = [llm.engine.encode(x) for x in PROMPTS[:3]]
    with torch.inference_mode():
        caches, single = [], []
        for ids in prompts:
            c = m.new_cache(1, len(ids) + 2)
            m.forward(torch.tensor([ids]), c, torch.arange(len(ids))[None])
            caches.append(c)
        ref_caches = [type(c)([k.clone() for k in c.k], [v.clone() for v in c.v], c.valid.clone(), c.length)
                      for c in caches]
        for ids, c in zip(prompts, ref_caches):
            single.append(m.forward(torch.tensor([[7]]), c, torch.tensor([[len(ids)]]))[0])
        rows = m.decode_rows([7, 7, 7], caches, [len(p) for p in prompts])
    for b in range(3):
        assert torch.equal(rows[b], single[b])
        assert caches[b].length == ref_caches[b].length
        assert all(torch.equal(k1, k2) for k1, k2 in zip(caches[b].k, ref_caches[b].k))


def test_each_row_keeps_its_own_sampling(tiny):
    eng = tiny.engine
    seeded = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3, stop_token_ids=[])
    penalised = SamplingParams(max_new_tokens=8, repetition_penalty=1.3, stop_token_ids=[])
    stops = SamplingParams(max_new_tokens=30, stop=[" the"])
    jobs = [(eng.encode(PROMPTS[0]), seeded), (eng.encode(PROMPTS[1]), penalised), (eng.encode(PROMPTS[2]), stops)]
    alone = [eng.generate_ids([ids], p)[0].token_ids for ids, p in jobs]
    assert _run(BatchDecoder(eng, 3), jobs) == alone


def test_bad_inputs(tiny):
    eng = tiny.engine
    for bad in (0, -1, 2.5):
        with pytest.raises(InvalidOptionError, match="at least 1"):
            BatchDecoder(eng, bad)
    dec = BatchDecoder(eng, 2)
    with pytest.raises(InvalidOptionError, match="context"):
        dec.admit(list(range(1, 30)), SamplingParams(max_new_tokens=tiny.model.spec.max_positions))
    with pytest.raises(EmptyDataError, match="no tokens"):
        dec.admit([], SamplingParams())
    assert dec.free() == 2 and dec.step() == []
    with pytest.raises(InvalidOptionError, match="strategy"):
        BatchDecoder(eng, 2, "fastest")


def test_the_step_strategy_is_measured_per_batch_size(tiny, monkeypatch):
    """Probe steps alternate the two strategies; after PROBE_STEPS of each, the faster (by
    median) is kept for that batch size, and every later step of that size uses it."""
    import edgesparse.batching as batching
    clock = iter(x * 0.5 for x in range(10_000))
    monkeypatch.setattr(batching.time, "perf_counter", lambda: next(clock))   # each step "takes" 0.5 s
    eng = tiny.engine
    dec = BatchDecoder(eng, 2)
    used = []
    real_rows = tiny.model.decode_rows
    monkeypatch.setattr(tiny.model, "decode_rows", lambda *a: (used.append("rows"), real_rows(*a))[1])
    for prompt in PROMPTS[:2]:
        dec.admit(eng.encode(prompt), SamplingParams(max_new_tokens=20, stop_token_ids=[]))
    choice = None
    for _ in range(2 * batching.PROBE_STEPS):
        dec.step()
        choice = dec.choices[2]
    assert [len(v) for v in choice.times.values()] == [batching.PROBE_STEPS] * 2
    assert used == ["rows"] * batching.PROBE_STEPS and choice.chosen in batching.STRATEGIES
    c = batching.StepChoice()
    for t_rows, t_each in ((3, 1), (3, 2), (1, 2)):   # medians: rows 3, each 2
        c.record(c.next(), t_rows)
        c.record(c.next(), t_each)
    assert c.chosen == "each" and c.next() == "each"
