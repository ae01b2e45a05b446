"""PyTorch eager inference of a YOCO checkpoint, timed: the baseline `yoco bench --torch` prints
beside yoco's own figures, in the same run and on the same model.

It serves a prompt the way a PyTorch user would write YOCO inference (and the way yoco does;
`tools/train/infer.py`): the self-decoder over the whole prompt with chunkwise gated retention
(the official chunk of 256), the global K/V of every position, the cross-decoder for the last
position only; then greedy decode, each token one step of the recurrent retention and of
cross-attention over the cache. The model is `tools/train/model.py` (checked against the
independent reference there), in float32 or converted with `model.to(torch.bfloat16)` (oneDNN's
bf16 kernels, every tensor in bf16), under `torch.inference_mode()`.

    python tools/bench/torch_yoco.py MODEL_DIR --lengths 4096,16384 --dtypes f32,bf16

prints one JSON object: for each dtype and length the prefill seconds, the decode tokens/s at
that context, and the greedy token and its logit after the prompt (so the caller can check that
both ran the same model).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
import infer  # noqa: E402
from infer import Session  # noqa: E402

CHUNK = infer.BLOCK


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--lengths", default="4096,16384,32768")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "chunk": CHUNK, "runs": []}
    for name in args.dtypes.split(","):
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[name]
        model = infer.load(args.model_dir, dtype)
        with torch.inference_mode():  # warm-up: oneDNN builds its kernels on first use
            Session(model, 1024).prefill(torch.arange(1024))
        for n in (int(s) for s in args.lengths.split(",")):
            tokens = torch.tensor([(i * 7919) % 50000 for i in range(n)])
            with torch.inference_mode():
                s = Session(model, n + args.decode_tokens)
                started = time.perf_counter()
                logits = s.prefill(tokens)
                prefill = time.perf_counter() - started
                top = int(logits.argmax())
                first = (top, float(logits[top]))
                started = time.perf_counter()
                for _ in range(args.decode_tokens):
                    top = int(s.decode(top).argmax())
                decode = args.decode_tokens / (time.perf_counter() - started)
            out["runs"].append({
                "dtype": name, "context": n, "prefill_seconds": prefill, "decode_tokens_per_second": decode,
                "greedy_token": first[0], "greedy_logit": first[1],
            })
            print(f"torch {name} {n}: prefill {n / prefill:.0f} tok/s, decode {decode:.1f} tok/s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
