"""PyTorch's side of the built-in model's acceptance checks, written as a fixture the Rust tests
compare yoco against (`tests/fixtures/default_model.json`):

* perplexity of a held-out passage (documents yoco never trained on), computed by the
  independent float64 reference `tools/reference/yoco_ref.py` from the checkpoint yoco serves;
* the reference's greedy continuations of a few short English prompts;
* a passkey prompt at ~1K tokens and the reference's answer.

    python tools/train/evaluate.py --model coordinator/assets/default-model \
        --data target/train-data --out tests/fixtures/default_model.json
"""

import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import yoco_ref  # noqa: E402

from train import FILLER, QUESTION  # noqa: E402

PROMPTS = ["And God said,", "The computer", "In the beginning"]
HELDOUT_TOKENS = 2048


def load(model_dir):
    with open(os.path.join(model_dir, "params.json")) as f:
        params = json.load(f)
    W = {k: v.to(torch.float64) for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return yoco_ref.Config(params), W, tok


def passkey_prompt(key, reps, depth):
    """The passkey prompt yoco's needle benchmark sends (`tests/src/bin/needle.rs`): `reps`
    filler sentences, the needle after `depth` of them, then the question."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return FILLER * depth + needle + FILLER * (reps - depth) + QUESTION


def greedy(cfg, W, ids, n):
    inc = yoco_ref.Incremental(cfg, W)
    logits = inc.prefill_parallel(torch.tensor(ids, dtype=torch.long))
    out = []
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits = inc.step(t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg, W, tok = load(args.model)

    with open(os.path.join(args.data, "heldout.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    text = ""
    for d in docs:
        text += d + "\n\n"
        if len(tok.encode(text).ids) >= HELDOUT_TOKENS:
            break
    ids = tok.encode(text).ids[:HELDOUT_TOKENS]
    text = tok.decode(ids)
    assert tok.encode(text).ids == ids, "the held-out passage must re-encode to the same ids"
    with torch.no_grad():
        logits = yoco_ref.forward_full(cfg, W, torch.tensor(ids, dtype=torch.long))
        lp = torch.log_softmax(logits, -1)
        token_lp = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    nll = -token_lp.mean().item()
    print(f"held-out: {len(ids)} tokens, mean NLL {nll:.6f}, perplexity {math.exp(nll):.4f}")

    continuations = []
    with torch.no_grad():
        for p in PROMPTS:
            pid = tok.encode(p).ids
            g = greedy(cfg, W, pid, 24)
            continuations.append({"prompt": p, "prompt_ids": pid, "greedy_ids": g})
            print(f"{p!r} -> {tok.decode(g)!r}")

        key = "52817"
        pids, reps = [], 4
        while True:
            prompt = passkey_prompt(key, reps, reps // 3)
            ids_ = tok.encode(prompt).ids
            if len(ids_) > 1024:
                break
            pids, reps = ids_, reps + 1
        prompt = passkey_prompt(key, reps - 1, (reps - 1) // 3)
        answer = greedy(cfg, W, pids, 6)
        print(f"passkey at {len(pids)} tokens -> {tok.decode(answer)!r}")

    fixture = {
        "about": "written by tools/train/evaluate.py from the float64 reference; see tools/train/README.md",
        "heldout": {"text": text, "ids": ids, "mean_nll": nll, "perplexity": math.exp(nll)},
        "continuations": continuations,
        "passkey": {"prompt": prompt, "prompt_tokens": len(pids), "key": key, "greedy_ids": answer},
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
