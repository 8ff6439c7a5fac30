"""Zero-shot scoring: log-likelihood plumbing on the real task files, dense vs exact-sparse."""
import json

import pytest
import torch

import edgesparse
from edgesparse.apps.cli import main
from edgesparse.eval.zeroshot import TASKS, continuation_logprob, eval_zeroshot


def test_continuation_logprob_matches_manual_sum():
    llm = edgesparse.load("tiny", backend="cpu")
    m, tok = llm.model, llm.tokenizer
    lp, greedy = continuation_logprob(m, tok, "The city of", " London", sparse=False)
    ids = tok("The city of London", add_special_tokens=False)["input_ids"]
    n = len(tok(" London", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = m.forward(torch.tensor([ids]), m.new_cache(1, len(ids)), torch.arange(len(ids))[None],
                           all_logits=True)[0]
    manual = sum(torch.log_softmax(logits[i - 1].float(), -1)[ids[i]].item() for i in range(len(ids) - n, len(ids)))
    assert lp == pytest.approx(manual, abs=1e-3) and isinstance(greedy, bool)


def test_exact_sparse_scores_equal_dense_on_every_task():
    llm = edgesparse.load("tiny", backend="cpu")
    dense = eval_zeroshot(llm, limit=4, sparse=False)
    sparse = eval_zeroshot(llm, limit=4, sparse=True)   # ffn mode "exact" is lossless
    assert set(dense) == set(TASKS) and dense == sparse
    assert all(0 <= r["acc"] <= 1 and r["n"] == 4 for r in dense.values())


def test_cli_zeroshot_json_and_bad_task(capsys):
    assert main(["eval", "zeroshot", "tiny", "--tasks", "piqa", "--limit", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dense"]["piqa"]["n"] == 3 and out["sparse"]["piqa"]["n"] == 3
    assert main(["eval", "zeroshot", "tiny", "--tasks", "nope", "--limit", "3"]) == 2
