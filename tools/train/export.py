"""Exports a training run as yoco's built-in model: the weights rounded to bf16 (the files
yoco serves and PyTorch's checks read are the same), params.json, tokenizer.json, and a short
record of how it was trained.

    python tools/train/export.py --run target/yoco-tiny-text --out coordinator/assets/default-model
"""

import argparse
import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    W = load_file(os.path.join(args.run, "model.safetensors"))
    W = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(W.items())}
    save_file(W, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    for name in ("params.json", "tokenizer.json"):
        shutil.copyfile(os.path.join(args.run, name), os.path.join(args.out, name))
    with open(os.path.join(args.run, "train_log.json")) as f:
        log = json.load(f)
    evals = [s for s in log["steps"] if "heldout_loss" in s]
    phases, p = [], log
    while p is not None:
        if "phases" in p:  # an exported model's training.json: its phases, whole
            phases[:0] = p["phases"]
            break
        phases.insert(0, {"args": p["args"], "evals": [s for s in p["steps"] if "heldout_loss" in s],
                          "seconds": p["steps"][-1]["elapsed_s"]})
        p = p.get("previous_phase")
    record = {
        "trained_by": "tools/train/train.py",
        "phases": phases,
        "torch": log["torch"],
        "threads": log["threads"],
        "n_params": log["n_params"],
        "final": evals[-1] if evals else log["steps"][-1],
        "model_sha256": hashlib.sha256(open(os.path.join(args.out, "model.safetensors"), "rb").read()).hexdigest(),
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"{len(W)} tensors, {sum(v.numel() for v in W.values()) / 1e6:.2f} M parameters -> {args.out}")


if __name__ == "__main__":
    main()
