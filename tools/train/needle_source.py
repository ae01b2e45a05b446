"""Where does a model keep the needle it retrieves: in the self-decoder's retention state, or in
the global K/V cache the cross-decoder reads? Each of eval_tail's passkey prompts is answered
three ways (tail-only, the answer teacher-forced, all five digits right):

* as is;
* "state without needle": the question starts from the retention states of the same prompt with
  the needle's tokens replaced by as many filler tokens (same length, same ending), the global K/V
  of the real prompt kept — only the cache holds the key;
* "cache without needle": the real prompt's states, the needle-free prompt's K/V — only the
  state holds the key.

A model that retrieves from the cache keeps its accuracy in the second column at any depth; one
that answers from its retention state forgets the needle as the state decays.

    python needle_source.py --model ../../coordinator/assets/default-model --lengths 1K,4K --trials 16
"""

import argparse
import os
import sys

import torch
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_tail import FILLER, MASK64, QUESTION, needle, parse_len, trials  # noqa: E402
from infer import Session, load  # noqa: E402

MODES = ("as is", "state without needle", "cache without needle")


def needle_free(tok, prompt, depth, target):
    """The prompt's tokens before the question, and the same with the needle's tokens replaced
    by filler tokens (the prompt is FILLER * d + needle + FILLER * (reps - d) + QUESTION)."""
    q_ids = tok.encode(" " + QUESTION).ids
    assert prompt[-len(q_ids) :] == q_ids, "the question's tokens end the prompt"
    head = prompt[: -len(q_ids)]
    per_filler = len(tok.encode(FILLER * 64).ids) / 64.0
    reps = max(int((target - len(tok.encode(needle("00000") + QUESTION).ids)) // per_filler), 1)
    d = round(depth * reps)
    pre = tok.encode((FILLER * d).rstrip()).ids if d else []
    n = len(head) - len(pre) - len(tok.encode(" " + (FILLER * (reps - d)).rstrip()).ids)
    assert head[: len(pre)] == pre and 20 < n < 40, "the needle's tokens"
    return head, head[: len(pre)] + tok.encode(FILLER * 4).ids[:n] + head[len(pre) + n :]


@torch.inference_mode()
def answers(model, head, plain, question, answer, piece):
    """Whether the answer is right in each of MODES."""
    cap = len(head) + len(question) + len(answer)
    real, free = Session(model, cap), Session(model, cap)
    real.feed(torch.tensor(head), piece)
    free.feed(torch.tensor(plain), piece)
    out = []
    for mode in MODES:
        s = Session(model, cap)
        kv = free if mode == "cache without needle" else real
        s.K[:, :, : len(head)], s.V[:, :, : len(head)] = kv.K[:, :, : len(head)], kv.V[:, :, : len(head)]
        s.len = len(head)
        s.states = list((free if mode == "state without needle" else real).states)
        pred = s.cross(s.feed(torch.tensor(question + answer[:-1]), keep=len(answer))).argmax(-1).tolist()
        out.append(pred == answer)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="coordinator/assets/default-model")
    ap.add_argument("--lengths", default="1K,4K")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--piece", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    question = tok.encode(" " + QUESTION).ids
    rng = (args.seed * 0x9E3779B97F4A7C15 & MASK64) | 1
    print("| context (tokens) | " + " | ".join(MODES) + " |")
    print("|---:|" + "---:|" * len(MODES))
    for target in [parse_len(s) for s in args.lengths.split(",")]:
        cases, rng = trials(tok, target, args.trials, rng)
        hits = [0] * len(MODES)
        for prompt, answer, _, depth in cases:
            head, plain = needle_free(tok, prompt, depth, target)
            for i, ok in enumerate(answers(model, head, plain, question, answer, args.piece)):
                hits[i] += ok
        print(f"| {target} | " + " | ".join(f"{h}/{len(cases)}" for h in hits) + " |", flush=True)


if __name__ == "__main__":
    main()
