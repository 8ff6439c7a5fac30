"""``edgesparse eval zeroshot``: LAMBADA, PIQA, ARC-Easy and HellaSwag by log-likelihood,
scored the way lm-eval-harness scores them (same prompts; acc, and acc_norm by byte length
for HellaSwag/ARC), on the files in ``../shared/data``.  Sparse modes apply the decode-time
sparsity to every scored token (``sparse_prefill``)."""
from __future__ import annotations

import bz2
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from ..progress import progress

TASKS = ("lambada", "piqa", "arc_easy", "hellaswag")


def _lambada(d: Path):
    for line in (d / "lambada_openai_test.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        ctx, word = text.rsplit(" ", 1)
        yield ctx, [" " + word], 0


def _piqa(d: Path):
    labels = (d / "piqa-valid-labels.lst").read_text().split()
    for line, lab in zip((d / "piqa-valid.jsonl").read_text().splitlines(), labels):
        it = json.loads(line)
        yield f"Question: {it['goal']}\nAnswer:", [" " + it["sol1"], " " + it["sol2"]], int(lab)


def _arc_easy(d: Path):
    for line in (d / "arc-easy-test.jsonl").read_text().splitlines():
        it = json.loads(line)
        labels = it["choices"]["label"]
        yield (f"Question: {it['question']}\nAnswer:", [" " + t for t in it["choices"]["text"]],
               labels.index(it["answerKey"]))


def _hellaswag(d: Path):
    lines = bz2.open(d / "hellaswag_val_full.txt.bz2", "rt").read().split("\n")
    for i in range(0, len(lines) - 5, 6):
        yield lines[i], [" " + e for e in lines[i + 2:i + 6]], int(lines[i + 1])


LOADERS = {"lambada": _lambada, "piqa": _piqa, "arc_easy": _arc_easy, "hellaswag": _hellaswag}


def continuation_logprob(model, tok, ctx: str, cont: str, sparse: bool) -> tuple[float, bool]:
    """Sum of log p(continuation | context), and whether greedy decoding would produce it."""
    c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    x_ids = tok(cont, add_special_tokens=False)["input_ids"]
    ids = (c_ids + x_ids)[-model.spec.max_positions:]
    n = len(x_ids)
    t = torch.tensor([ids], device=model.ex.device)
    logits = model.forward(t, model.new_cache(1, t.shape[1]), torch.arange(t.shape[1], device=t.device)[None],
                           all_logits=True, sparse_prefill=sparse)[0, -n - 1:-1].float()
    target = t[0, -n:]
    lp = F.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
    return lp, bool((logits.argmax(-1) == target).all())


def eval_zeroshot(llm, tasks=TASKS, limit: int | None = 200, data_dir=None, sparse: bool = True) -> dict:
    from .data import find_data_dir
    d = Path(data_dir) if data_dir else find_data_dir()
    bad = [t for t in tasks if t not in LOADERS]
    if bad:
        raise InvalidOptionError(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
    m, tok = llm.model, llm.tokenizer
    out = {}
    with torch.inference_mode():
        for task in tasks:
            items = list(LOADERS[task](d))[:limit]
            acc = acc_norm = 0
            for ctx, conts, gold in progress(items, desc=task):
                scores = [continuation_logprob(m, tok, ctx, c, sparse) for c in conts]
                if task == "lambada":
                    acc += scores[0][1]
                    continue
                lps = [s[0] for s in scores]
                acc += int(max(range(len(lps)), key=lps.__getitem__) == gold)
                normed = [lp / len(c.encode()) for lp, c in zip(lps, conts)]
                acc_norm += int(max(range(len(normed)), key=normed.__getitem__) == gold)
            res = {"acc": round(acc / len(items), 4), "n": len(items)}
            if task != "lambada":
                res["acc_norm"] = round(acc_norm / len(items), 4)
            out[task] = res
    return out
