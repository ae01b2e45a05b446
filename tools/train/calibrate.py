"""Sharpen the cross-decoder's attention after training, exactly: a constant factor on a
cross-attention head's logits is the same factor on that head's rows of q_proj (RoPE is linear
and no norm follows q_proj), so the served forward pass is unchanged and only weights move.
This measures, for each factor, held-out loss at 1024 tokens and passkey retrieval tail-only
(eval_tail's prompts) at the given lengths, and with --out writes the model with the chosen
factors folded in.

    python calibrate.py --model ../../coordinator/assets/default-model --data ../../target/train-data \\
        --factors 1,1.25,1.5,2 --lengths 4K,16K --trials 16 [--per-layer] [--out DIR --apply 1.5]
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_tail import MASK64, parse_len, run_trial, trials  # noqa: E402
from infer import load  # noqa: E402
from train import heldout_loss  # noqa: E402


def cross_q(model):
    return [layer.mixer.q_proj.weight for layer in model.cross_decoder.layers]


@torch.inference_mode()
def measure(model, tok, data, lengths, n, seed, piece):
    row = {"heldout_loss": heldout_loss(model, data, tok, 1024)}
    rng = (seed * 0x9E3779B97F4A7C15 & MASK64) | 1
    for target in lengths:
        cases, rng = trials(tok, target, n, rng)
        row[str(target)] = sum(run_trial(model, p, a, piece)[0] for p, a, _, _ in cases) / n
    return row


def parse_factors(s, layers):
    """"1.5" (every layer) or "1.5:2" (one per layer)."""
    f = [float(x) for x in s.split(":")]
    return f * layers if len(f) == 1 else f


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--factors", default="1,1.25,1.5,2", help="comma-separated; each '1.5' or per layer '1.5:2'")
    ap.add_argument("--lengths", default="4K,16K")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--piece", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="write the model with --apply's factors folded into q_proj here")
    ap.add_argument("--apply", help="the factors to fold in (as one entry of --factors)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    layers = len(model.cross_decoder.layers)
    base = [w.detach().clone() for w in cross_q(model)]
    lengths = [parse_len(s) for s in args.lengths.split(",")] if args.lengths else []
    print("| factors | held-out ppl | " + " | ".join(f"passkey @{t}" for t in lengths) + " | s |")
    print("|---|---:|" + "---:|" * len(lengths) + "---:|")
    for spec in args.factors.split(",") if not args.out else []:
        factors = parse_factors(spec, layers)
        with torch.no_grad():
            for w, b, f in zip(cross_q(model), base, factors):
                w.copy_(b * f)
        started = time.time()
        row = measure(model, tok, args.data, lengths, args.trials, args.seed, args.piece)
        cells = " | ".join(f"{row[str(t)]:.2f}" for t in lengths)
        print(f"| {spec} | {math.exp(row['heldout_loss']):.3f} | {cells} | {time.time() - started:.0f} |", flush=True)
    if args.out:
        factors = parse_factors(args.apply, layers)
        os.makedirs(args.out, exist_ok=True)
        for name in os.listdir(args.model):
            if not name.endswith(".safetensors"):
                shutil.copy(os.path.join(args.model, name), os.path.join(args.out, name))
        for name in os.listdir(args.model):
            if name.endswith(".safetensors"):
                w = load_file(os.path.join(args.model, name))
                for i, f in enumerate(factors):
                    key = f"cross_decoder.layers.{i}.mixer.q_proj.weight"
                    if key in w:
                        w[key] = (w[key].to(torch.float32) * f).to(w[key].dtype)
                save_file(w, os.path.join(args.out, name), metadata={"format": "pt"})
        with open(os.path.join(args.out, "calibration.json"), "w") as f:
            json.dump({"from": args.model, "cross_q_proj_factors": factors}, f, indent=1)
        print(f"wrote {args.out} with cross q_proj factors {factors}")


if __name__ == "__main__":
    main()
