"""Train the embedded ``tiny`` ReGLU Llama (fixed seed, CPU, 42 min on 2 cores).

    apt-get download fortunes fortunes-min debian-handbook && for f in *.deb; do dpkg -x $f deb; done
    python -m edgesparse.embedded.train --out edgesparse/embedded/tiny --minutes 42 --debian-dir deb

The recipe follows ProSparse-style activation-sparsity training: a plain causal LM
loss plus an L1 penalty on the ReGLU activations ``relu(gate(x))``, ramped up over
training, so most gate pre-activations end up <= 0 for a given token (the natural
sparsity the SVD predictors exploit).  The text is ``corpus.py``'s: English that reads like
English (no ``<unk>``, no tokenised spacing).  The WikiText-2 *test* text is never read.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from edgesparse.eval.data import find_data_dir
from .corpus import load_corpus

# The files `edgesparse calibrate` reads when given no --data (the first tiny's training
# text; see ../shared/data/README.md).  WikiText-2 test is evaluation-only.
CORPUS = {
    "wikitext-2-tok-valid.txt": 3,
    "tinyshakespeare.txt": 1,
    "ptb-valid.txt": 1,
    "ptb-test.txt": 1,
    "python-3.11-docs.rst.txt": 1,
}
# Repeats per corpus.py text: the demo prompts are encyclopaedic, WikiText is the shortest.
REPEATS = {"wikitext-2-valid (detokenised, no <unk>)": 3}
VOCAB = 8192


def build_tokenizer(docs: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # ChatML template so `edgesparse chat tiny` works like any instruct checkpoint.
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(out)
    return fast


def make_config(hidden=256, layers=4, heads=8, kv_heads=4, ffn=1024):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       hidden_act="relu", max_position_embeddings=1024, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                       rope_theta=10000.0, attention_bias=False, mlp_bias=False)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("tiny")))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target-sparsity", type=float, default=0.9,
                    help="natural FFN sparsity the L1 controller steers towards")
    ap.add_argument("--python-docs-chars", type=int, default=1_000_000)
    ap.add_argument("--debian-dir", type=Path, default=None,
                    help="dir the fortunes and debian-handbook packages were unpacked into (dpkg -x)")
    ap.add_argument("--seed", type=int, default=0)
    # the shape: the defaults are tiny's; other shapes train held-out checkpoints for calibration
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 8), ("kv-heads", 4), ("ffn", 1024)):
        ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args(argv)

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_corpus(find_data_dir(), args.python_docs_chars, args.debian_dir)
    for name, text in texts.items():
        print(f"{name}: {len(text):,} chars x {REPEATS.get(name, 1)}", flush=True)
    docs = [t for name, t in texts.items() for _ in range(REPEATS.get(name, 1))]
    tok = build_tokenizer(docs, out)
    ids = torch.tensor([t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]], dtype=torch.long)
    print(f"corpus tokens: {ids.numel():,}", flush=True)

    cfg = make_config(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
    model = LlamaForCausalLM(cfg)
    print(f"params: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    acts = []
    for layer in model.model.layers:
        layer.mlp.act_fn.register_forward_hook(lambda m, i, o: acts.append(o))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    t0 = time.time()
    step, log = 0, []
    # L1 coefficient steered by a multiplicative controller: the raw scale of the penalty
    # that yields a given sparsity depends on width and data, the target share does not.
    lam, sparsity = 0.0, 0.0
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        # Warmup, cosine decay; L1 ramps in after the model has learnt something.
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        ramp = min(1.0, max(0.0, (frac - 0.15) / 0.45))
        goal = 0.5 + (args.target_sparsity - 0.5) * ramp
        if ramp > 0:
            lam = max(lam, 1e-3) * math.exp(0.1 * max(-1.0, min(1.0, (goal - sparsity) * 10)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, ids.numel() - args.seq - 1, (args.batch,))
        x = torch.stack([ids[s:s + args.seq + 1] for s in starts])
        acts.clear()
        logits = model(input_ids=x[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        l1 = sum(a.abs().mean() for a in acts) / len(acts)
        loss = ce + lam * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            sparsity = sum((a <= 0).float().mean().item() for a in acts) / len(acts)
        if step % 25 == 0:
            rec = dict(step=step, t=round(time.time() - t0), ce=round(ce.item(), 3), l1=round(l1.item(), 4),
                       lam=round(lam, 5), sparsity=round(sparsity, 3), lr=round(lr, 5))
            log.append(rec)
            print(json.dumps(rec), flush=True)
        step += 1
    # bf16 on disk keeps the shipped checkpoint under 16 MB; edgesparse loads it as fp32.
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    run = dict(vars(args), debian_dir=args.debian_dir and str(args.debian_dir))
    corpus = {name: dict(chars=len(t), repeats=REPEATS.get(name, 1)) for name, t in texts.items()}
    (out / "training_log.json").write_text(json.dumps(dict(args=run, corpus=corpus, steps=step, log=log), indent=1))
    print(f"saved to {out} after {step} steps", flush=True)


if __name__ == "__main__":
    main()
