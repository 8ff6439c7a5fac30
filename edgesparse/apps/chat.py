"""``edgesparse chat``: a multi-turn terminal chat with streamed answers.

Commands: /reset (forget the conversation), /stats (speed and sparsity of the last answer),
/quit.  Ctrl-C while an answer streams stops that answer and keeps the session."""
from __future__ import annotations

import sys
import time

HELP = "commands: /reset  /stats  /quit   (Ctrl-C stops an answer)"


def chat_loop(llm, max_new_tokens=256, temperature=0.7, top_p=0.9, seed=None, system=None,
              read=input, write=sys.stdout.write, min_p=0.0, repetition_penalty=1.0, top_k=0):
    def fresh():
        return [{"role": "system", "content": system}] if system else []
    messages = fresh()
    last = {}
    write(f"edgesparse chat with {llm.name} on {llm.backend} (ffn mode: {llm.model.ffn_mode}). {HELP}\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return
        if cmd == "/reset":
            messages = fresh()
            write("(conversation cleared)\n")
            continue
        if cmd == "/stats":
            write(", ".join(f"{k}: {v}" for k, v in last.items()) + "\n" if last else "(no answer yet)\n")
            continue
        if cmd.startswith("/"):
            write(f"unknown command {cmd}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        prompt = llm.chat_prompt(messages)
        llm.model.stats.reset()
        pieces, fin = [], {}
        t0 = time.perf_counter()
        try:
            for piece in llm.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                    stop_token_ids=llm.chat_stop_ids(), on_finish=fin.update):
                pieces.append(piece)
                write(piece)
                if hasattr(sys.stdout, "flush"):
                    sys.stdout.flush()
        except KeyboardInterrupt:
            write(" [stopped]")
            fin["finish_reason"] = "interrupted"
        dt = time.perf_counter() - t0
        write("\n")
        answer = "".join(pieces)
        messages.append({"role": "assistant", "content": answer})
        n = fin.get("completion_tokens", len(llm.tokenizer(answer)["input_ids"]))
        s = llm.model.sparsity_in_use()   # every mode: FFN/gate rows skipped, Top-K share kept
        last = {"tokens": n, "tokens/s": round(n / dt, 1) if dt > 0 else 0.0,
                "finish": fin.get("finish_reason", "?")}
        if s["ffn_sparsity"] is not None:
            last["ffn_sparsity"] = round(s["ffn_sparsity"], 3)
        if llm.model.ffn_mode == "predictor":
            last["gate_sparsity"] = round(s["gate_sparsity"], 3)
        if s["topk_kept"]:
            last["topk_kept"] = s["topk_kept"]
