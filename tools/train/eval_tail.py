"""Passkey retrieval of a YOCO checkpoint in PyTorch, tail-only: the figures to put beside yoco's
`needle` (tests/src/bin/needle.rs), which this builds the very same prompts as.

YOCO needs the cross-decoder only where logits are read, so a trial is: the self-decoder over
the prompt in pieces (`infer.Session`: retention state carried, K/V kept for every token), then
the cross-decoder and logits on the last prompt token and the teacher-forced answer. A trial is
a hit when the greedy token at each of those rows is the answer's (" " and the five digits), as
greedy decoding would produce it. 16K takes a few seconds, 1M about a minute on 2 cores.

    python tools/train/eval_tail.py --model coordinator/assets/default-model \\
        --lengths 16K,128K --trials 16 [--json out.json]

Prompts: the classic filler ("The grass is green. ..."), the key "The pass key is NNNNN.
Remember it. NNNNN is the pass key." at depth (t + 0.5) / trials of the filler, then "What is
the pass key? The pass key is"; keys from needle's xorshift stream (same --seed, same keys).
"""

import argparse
import json
import os
import sys
import time

import torch
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infer import Session, load  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"
MASK64 = (1 << 64) - 1


def needle(key):
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def parse_len(s):
    s = s.strip()
    mult = {"K": 1 << 10, "k": 1 << 10, "M": 1 << 20, "m": 1 << 20}.get(s[-1], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def trials(tok, target, n, rng):
    """needle's prompts for one length: (prompt ids, answer ids, key, depth); rng is the
    xorshift state, advanced as needle advances it."""
    count = lambda text: len(tok.encode(text).ids)  # noqa: E731
    per_filler = max(count(FILLER * 64) / 64.0, 1.0)
    overhead = count(needle("00000") + QUESTION)
    reps = max(int((target - overhead) // per_filler), 1)
    out = []
    for t in range(n):
        rng ^= (rng << 13) & MASK64
        rng ^= rng >> 7
        rng ^= (rng << 17) & MASK64
        key = f"{rng % 100_000:05d}"
        depth = int(reps * (t + 0.5) / n)
        prompt = FILLER * depth + needle(key) + FILLER * (reps - depth) + QUESTION
        out.append((tok.encode(prompt).ids, tok.encode(" " + key).ids, key, depth / reps))
    return out, rng


@torch.inference_mode()
def run_trial(model, prompt, answer, piece):
    ids = torch.tensor(prompt + answer[:-1])
    s = Session(model, ids.shape[0])
    logits = s.cross(s.feed(ids, piece, keep=len(answer)))
    pred = logits.argmax(-1).tolist()
    return pred == answer, pred


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="coordinator/assets/default-model")
    ap.add_argument("--lengths", default="1K,4K,16K")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--piece", type=int, default=16384, help="self-decoder tokens per piece")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    rng = (args.seed * 0x9E3779B97F4A7C15 & MASK64) | 1
    rows = []
    print("| context (tokens) | prompt tokens | accuracy | s/trial |")
    print("|---:|---:|---:|---:|")
    for target in [parse_len(s) for s in args.lengths.split(",")]:
        cases, rng = trials(tok, target, args.trials, rng)
        hits, started = 0, time.time()
        for t, (prompt, answer, key, depth) in enumerate(cases):
            hit, pred = run_trial(model, prompt, answer, args.piece)
            hits += hit
            said = tok.decode(pred)
            print(f"{target}: trial {t} depth {depth:.2f} key {key} -> {said!r} {'ok' if hit else 'MISS'}", file=sys.stderr)
        per = (time.time() - started) / len(cases)
        rows.append({"target": target, "prompt_tokens": len(cases[-1][0]), "hits": hits, "trials": len(cases),
                     "seconds_per_trial": per})
        print(f"| {target} | {len(cases[-1][0])} | {hits}/{len(cases)} ({100 * hits / len(cases):.0f}%) | {per:.1f} |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
