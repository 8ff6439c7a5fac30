"""``GET /metrics``: the server's counters in the Prometheus text format (version 0.0.4), for
the dashboards and alerts operators already run against llama.cpp's and vLLM's servers.

Counters only grow (requests by outcome, tokens, engine seconds); rates such as tokens/s are
the scraper's ``rate()`` of them.  Gauges: the queue, the running slot(s) and the FFN / Top-K
sparsity the model measured over the tokens it has decoded."""
from __future__ import annotations


def _line(name: str, value, labels: dict | None = None) -> str:
    lab = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return f"{name}{lab} {float(value):.6g}" if isinstance(value, float) else f"{name}{lab} {value}"


def render(worker, model, slots: int = 1) -> str:
    """The page, from ``EngineWorker.health`` / ``totals_snapshot`` and the model's stats."""
    h, t = worker.health(), worker.totals_snapshot()
    out: list[str] = []

    def metric(name, kind, help_, samples):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_line(name, v, lab) for lab, v in samples)

    metric("edgesparse_requests_total", "counter", "Requests by outcome.",
           [({"outcome": k}, h[k]) for k in ("served", "cancelled", "failed", "rejected")])
    metric("edgesparse_prompt_tokens_total", "counter", "Prompt tokens of the requests run.",
           [(None, t["prompt_tokens"])])
    metric("edgesparse_completion_tokens_total", "counter", "Tokens generated.", [(None, t["completion_tokens"])])
    metric("edgesparse_prefill_seconds_total", "counter", "Engine seconds from a request's start to its first token.",
           [(None, float(t["prefill_seconds"]))])
    metric("edgesparse_decode_seconds_total", "counter", "Engine seconds from first to last token.",
           [(None, float(t["decode_seconds"]))])
    metric("edgesparse_queue_depth", "gauge", "Requests waiting for a slot.", [(None, h["queued"])])
    metric("edgesparse_slots_busy", "gauge", "Slots decoding now.", [(None, h["running"])])
    metric("edgesparse_slots", "gauge", "Slots (requests decoded at once).", [(None, slots)])
    metric("edgesparse_healthy", "gauge", "1 when /health reports ok.", [(None, int(h["status"] == "ok"))])
    s = model.stats.summary()
    metric("edgesparse_sparsity", "gauge", "Share of rows skipped over the tokens decoded so far.",
           [({"kind": k}, float(s[f"{k}_sparsity"])) for k in ("ffn", "gate")])
    metric("edgesparse_info", "gauge", "The model and how it runs.",
           [({"ffn_mode": model.ffn_mode, "attn_mode": model.attn_mode}, 1)])
    return "\n".join(out) + "\n"
