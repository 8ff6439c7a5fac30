"""Screening for the predicted LM head (issue: a low-rank preview picks the candidate tokens,
exact logits only for them): does a *certified* preview pay on a real model?

The preview projects the final hidden state ``h`` onto the top-``r`` principal directions
``V_r`` of calibration hidden states (PCA, fitted on WikiText-2 validation text) and scores
every token with ``P = W·V_r`` (``W``: the head as it runs, de-quantised).  The part of ``h``
outside that subspace, ``h_⊥``, is known exactly at run time (``‖h_⊥‖² = ‖h‖² − ‖V_rᵀh‖²``), and
each head row's part outside it has a norm ``ρ_i = ‖W_i·V_⊥‖`` fixed at calibration, so
``|logit_i − preview_i| ≤ ρ_i·‖h_⊥‖`` for every token i (Cauchy-Schwarz), with no assumption
about ``h``.  The candidates are the ``m`` tokens of highest upper bound; their exact logits
are computed; the greedy token is certified when no other token's upper bound reaches the best
exact logit, and otherwise the step falls back to the full head.

Measured on the first N WikiText-2 test tokens (evaluation text, never fitted on): the share of
certified steps, the top-1 agreement without fallback, and the head bytes a token would read
(preview at int8 + bounds + candidate rows + fallbacks), against the dense head.  Prints JSON.

    python bench/head_preview_screen.py [--tokens 8192] [--ranks 32 64 128 192] [--cands 64 256 1024]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def hidden_states(llm, text: str, n_tokens: int, window: int = 512) -> torch.Tensor:
    """Final normed hidden states (what the head multiplies) of ``n_tokens`` tokens of ``text``."""
    m = llm.model
    got = []
    real = m._logits

    def capture(x):
        got.append(llm.model.ex.rms_norm(x, m.norm, m.spec.eps).float().reshape(-1, x.shape[-1]))
        return real(x)
    m._logits = capture
    ids = llm.tokenizer(text, return_tensors="pt")["input_ids"][0][:n_tokens]
    with torch.inference_mode():
        for s in range(0, len(ids), window):
            chunk = ids[s:s + window][None]
            m.forward(chunk, m.new_cache(1, chunk.shape[1]), torch.arange(chunk.shape[1])[None], all_logits=True)
    m._logits = real
    return torch.cat(got)[:n_tokens]


def head_matrix(llm) -> torch.Tensor:
    w = llm.model.lm_head.weight
    return (w.rows(torch.arange(w.shape[0]), torch.float32) if hasattr(w, "rows") else w.float())


def screen(W, calib, test, r: int, cands: list[int], row_bytes: float) -> list[dict]:
    V, d = W.shape
    g = calib.double().T @ calib.double()
    evals, evecs = torch.linalg.eigh(g)
    vr = evecs[:, -r:].float()                      # [d, r], top-r directions
    P = W @ vr                                      # [V, r]
    rho = (W - P @ vr.T).norm(dim=1)                # [V]: each row's part outside the subspace
    z = test @ vr                                   # [N, r]
    h_perp = (test.pow(2).sum(1) - z.pow(2).sum(1)).clamp(min=0).sqrt()   # [N]
    preview = z @ P.T                               # [N, V]
    upper = preview + rho[None] * h_perp[:, None]
    exact = test @ W.T                              # [N, V] (the reference)
    top1 = exact.argmax(1)
    out = []
    for m in cands:
        cand = upper.topk(m, dim=1).indices          # [N, m]
        ex_c = exact.gather(1, cand)
        best_val, best_pos = ex_c.max(1)
        picked = cand.gather(1, best_pos[:, None])[:, 0]
        outside = upper.scatter(1, cand, float("-inf"))
        certified = outside.max(1).values < best_val
        fallback = (~certified).float().mean().item()
        preview_bytes = V * r * 1 + V * 4 + d * r * 4 + V * 2      # int8 P (+ per-row scale), V_r, rho (fp16)
        per_token = preview_bytes + m * row_bytes + fallback * V * row_bytes
        by_preview = preview.topk(m, dim=1).indices   # SVD-softmax's choice: no bound, no fallback
        in_preview = (by_preview == top1[:, None]).any(1).float().mean().item()
        bound_gap = (rho[None] * h_perp[:, None]).gather(1, top1[:, None]).mean().item()
        logit_gap = (exact.topk(2, dim=1).values[:, 0] - exact.topk(2, dim=1).values[:, 1]).median().item()
        out.append(dict(rank=r, candidates=m, certified=round(1 - fallback, 4),
                        top1_in_preview_top_m=round(in_preview, 5),
                        mean_bound_width_at_top1=round(bound_gap, 3), median_top2_logit_gap=round(logit_gap, 3),
                        top1_agreement_without_fallback=round((picked == top1).float().mean().item(), 5),
                        head_bytes_vs_dense=round(per_token / (V * row_bytes), 4),
                        preview_bytes=preview_bytes, mean_h_perp_share=round((h_perp / test.norm(dim=1)).mean().item(), 4)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens scored")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="WikiText-2 validation tokens for the PCA")
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128, 192])
    ap.add_argument("--cands", type=int, nargs="+", default=[64, 256, 1024])
    a = ap.parse_args()
    import edgesparse
    from edgesparse.eval.data import find_data_dir
    data = find_data_dir()
    llm = edgesparse.load(a.model, backend="cpu")
    calib = hidden_states(llm, (data / "wikitext-2-tok-valid.txt").read_text()[:400_000], a.calib_tokens)
    test = hidden_states(llm, (data / "wikitext-2-raw-test.txt").read_text()[:200_000], a.tokens)
    W = head_matrix(llm)
    fmt = getattr(llm.model.lm_head.weight, "fmt", "fp32")
    row_bytes = {"q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32}.get(fmt, 4) * W.shape[1]
    rows = []
    for r in a.ranks:
        rows += screen(W, calib, test, r, a.cands, row_bytes)
    print(json.dumps(dict(model=Path(a.model).name, head=list(W.shape), head_format=fmt, test_tokens=len(test),
                          calib_tokens=len(calib), results=rows), indent=1))


if __name__ == "__main__":
    sys.exit(main())
