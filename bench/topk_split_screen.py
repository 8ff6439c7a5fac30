"""Screening (not CI): rotated Top-K on SmolLM2 Q4_1 at 40/50% with other splits of the block budget
between the rotated (qkv, gate|up) and unrotated (o, down) inputs; paired per-window NLL vs 0.8/1.2.

    python bench/topk_split_screen.py 8192 > split.log   (eval tokens; 8,192 calibration tokens)"""
import copy, json, math, sys, time
import torch
import edgesparse
from edgesparse.predictors import rotation as R
from edgesparse.sparsity.calibrate import collect, default_data
from edgesparse.sparsity.larosa import fit_rotations, install_topk, rotations_from_tensors, topk_sizes
from edgesparse.eval.data import find_data_dir, read_texts, token_windows
from edgesparse.eval.perplexity import window_nll
t0 = time.time()
llm = edgesparse.load("models/SmolLM2-135M-Instruct.Q4_1.gguf", backend="cpu")
llm.set_ffn_mode("dense")
m = llm.model
text, _ = read_texts(default_data())
col = collect(m, token_windows(llm.tokenizer, text, 256, 8192), keep_ffn=False)
rot = rotations_from_tensors(fit_rotations(m, col.gram, "shared"), m.spec.n_layers)
del col
wtext, _ = read_texts([find_data_dir() / "wikitext-2-raw-test.txt"])
windows = token_windows(llm.tokenizer, wtext, 512, int(sys.argv[1]))
dense, n = window_nll(m, windows, False, "dense")
print("dense", math.exp(dense / n), n, round(time.time() - t0), flush=True)
for level in (0.4, 0.5):
    base = None
    for a, b in ((0.8, 1.2), (0.6, 1.4), (0.45, 1.55), (1.0, 1.0)):
        R.ROTATED_SHARE, R.UNROTATED_SHARE = a, b
        ks = topk_sizes(m.spec, level, level)
        mm = copy.deepcopy(m)
        install_topk(mm, ks, *rot)
        per = []
        nll, _ = window_nll(mm, windows, True, f"{a}/{b}@{level}", per)
        per = torch.tensor(per, dtype=torch.float64)
        if base is None:
            base = per
        d = (per - base) * len(windows) / n
        print(json.dumps(dict(level=level, split=[a, b], ks=ks, ppl=round(math.exp(nll / n), 3),
                              gap_pct=round(100 * (math.exp((nll - dense) / n) - 1), 2),
                              vs_08=round(d.mean().item(), 5), se=round((d.std() / len(d) ** 0.5).item(), 5))),
              flush=True)
        del mm
