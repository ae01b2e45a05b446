"""Trains yoco's built-in model: a small YOCO (gated retention) on Debian-packaged English text
mixed with a synthetic passkey-retrieval task, on the CPU.

    python tools/train/prepare_data.py --out target/train-data
    python tools/train/train.py --data target/train-data --out target/yoco-tiny-text

Every random choice (initial weights, batches, passkeys, position skips) comes from one
recorded seed; the run is a fixed number of steps, so it is reproducible on one machine (up to
the float reduction order of the BLAS build and thread count, which `train_log.json` records).

The batch mix:
* text: a random window of the training token stream (documents joined by <|endoftext|>);
* passkey: filler (either the classic "The grass is green..." sentences or real text) with
  "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a random depth, ending with
  "What is the pass key? The pass key is NNNNN." The answer digits get extra loss weight.

Positions skip (PoSE, Zhu et al. 2023): in a share of the sequences the position ids jump by
random gaps, so that in training the rotary embedding already sees query-key distances up to
`--max-position` although sequences are `--seq` tokens long. yoco serves with contiguous
positions; the model only has to have met such distances.
"""

import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import eval_tail
import long_rows
from model import Yoco, check_against_reference

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def config(vocab):
    return {
        "dim": 256,
        "n_layers": 4,
        "hidden_dim": 768,
        "n_self_heads": 4,
        "n_attn_heads": 4,
        "n_attn_kv_heads": 2,
        "vocab_size": vocab,
        "rope_theta": 1.0e7,
        "norm_eps": 1e-5,
    }


class Batches:
    def __init__(self, data_dir, tok, seq, rng, max_position, passkey_share, pose_share, passkey_min=None):
        self.tok, self.seq, self.rng = tok, seq, rng
        self.passkey_min = passkey_min or seq
        self.answer_weight = 20.0
        self.key_digits_max = 5
        self.copy_share = 0.0
        self.max_position, self.passkey_share, self.pose_share = max_position, passkey_share, pose_share
        self.eos = eos = tok.token_to_id("<|endoftext|>")
        with open(os.path.join(data_dir, "train.jsonl"), encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        ids = []
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(eos)
        self.stream = torch.tensor(ids, dtype=torch.long)
        self.filler = tok.encode(FILLER * 8).ids
        self.question = tok.encode(" " + QUESTION).ids
        # the ten single-digit tokens (keys, copies, recall values, and their twins' replacements)
        self.digit_list = [tok.token_to_id(str(d)) for d in range(10)]
        self.digit_ids = set(self.digit_list)
        # word tokens ("Ġword", letters only) for the recall task's names
        self.words = [i for t, i in tok.get_vocab().items() if t.startswith("\u0120") and t[1:].isalpha() and len(t) > 3]
        self.recall_share = 0.0

    def text(self):
        start = self.rng.randrange(0, len(self.stream) - self.seq - 1)
        return self.stream[start : start + self.seq].tolist(), None

    def other_digits(self, tokens, spans):
        """A copy of `tokens` whose runs of digit tokens inside the [a, b) `spans` hold other
        digits: each distinct run gets a new string of its length, never its own (a key said
        twice stays one key, said twice). The twin of a retrieval row (`Yoco.forward`'s twin):
        its retention state holds a wrong answer, so only the global K/V can give the right one."""
        out, runs = list(tokens), []
        for a, b in spans:
            i = a
            while i < b:
                if tokens[i] in self.digit_ids:
                    j = i
                    while j < b and tokens[j] in self.digit_ids:
                        j += 1
                    runs.append((i, j))
                    i = j
                else:
                    i += 1
        new = {}
        for i, j in runs:
            old = tuple(tokens[i:j])
            while old not in new or new[old] == old:
                new[old] = tuple(self.rng.choice(self.digit_list) for _ in old)
            out[i:j] = new[old]
        return out

    def passkey(self):
        n_digits = 5 if self.key_digits_max <= 5 else self.rng.randint(5, self.key_digits_max)
        key = "".join(self.rng.choice("0123456789") for _ in range(n_digits))
        needle = self.tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ").ids
        answer = self.tok.encode(" " + key + ".").ids
        tail = self.question + answer
        length = self.seq
        if self.passkey_min < self.seq:
            # a shorter task (log-uniform length) after a stretch of text: short retrievals teach
            # the mechanism sooner, and it carries to long ones
            length = int(math.exp(self.rng.uniform(math.log(self.passkey_min), math.log(self.seq))))
            length = max(length, len(needle) + len(tail) + 8)
        n_fill = length - len(needle) - len(tail)
        if self.rng.random() < 0.5:
            reps = n_fill // len(self.filler) + 1
            fill = (self.filler * reps)[:n_fill]
        else:
            fill, _ = self.text()
            fill = fill[:n_fill]
        at = self.rng.randrange(0, n_fill + 1)
        tokens = fill[:at] + needle + fill[at:] + tail
        prefix = 0
        if length < self.seq:
            text, _ = self.text()
            tokens = text[: self.seq - length - 1] + [self.eos] + tokens
            prefix = len(tokens) - length
        # the distractors (text before the task, filler) and where the question starts, for the
        # virtual haystack and the needle-to-question position jump
        filler = [True] * prefix + [True] * at + [False] * len(needle) + [True] * (n_fill - at) + [False] * len(tail)
        self.last_haystack = (filler, len(tokens) - len(tail), prefix + at + len(needle))
        self.last_twin = ([(prefix + at, prefix + at + len(needle))], len(tokens) - len(tail))
        weights = [1.0] * len(tokens)
        first = len(tokens) - len(answer)
        # the answer's tokens but its final ".": the space and the digits (with --key-digits-max;
        # without, the first 5: the space and 4 of the 5 digits, as the shipped first phase ran)
        n_weighted = len(answer) - 1 if self.key_digits_max > 5 else 5
        for i in range(first, first + n_weighted):
            weights[i] = self.answer_weight
        return tokens, weights

    def copy(self):
        """A random digit string, filler or text, then the same string again, supervised: dense
        practice of the look-back-and-copy (induction) that passkey retrieval needs."""
        space = self.tok.token_to_id("\u0120")
        s = [self.rng.choice(self.digit_list) for _ in range(self.rng.randint(8, min(48, (self.seq - 4) // 3)))]
        gap = int(math.exp(self.rng.uniform(0, math.log(min(self.seq // 2, self.seq - 3 - 2 * len(s))))))
        if self.rng.random() < 0.5:
            fill = (self.filler * (gap // len(self.filler) + 1))[:gap]
        else:
            fill = self.text()[0][:gap]
        task = [space] + s + fill + [space] + s
        text, _ = self.text()
        tokens = (text[: self.seq - len(task) - 1] + [self.eos] + task)[: self.seq]
        weights = [1.0] * (len(tokens) - len(s)) + [self.answer_weight] * len(s)
        first = len(tokens) - len(task) + 1
        self.last_twin = ([(first, first + len(s))], len(tokens) - len(s) - 1)
        return tokens, weights

    def recall(self):
        """Multi-query associative recall: a few "names" (two random word tokens each) are given
        digit strings amid filler or text; later the names come again in a shuffled order, each
        followed by its digits, which are supervised. The passkey task is one such pair with the
        name "pass key is"; here many names and gaps of every length make the look-up (a
        query matching the tokens before a cached value) the only way to the answer."""
        pairs, budget = [], self.seq
        while True:
            name = [self.rng.choice(self.words) for _ in range(2)]
            value = [self.rng.choice(self.digit_list) for _ in range(self.rng.randint(3, 8))]
            cost = 2 * (len(name) + len(value)) + 2
            if budget - cost < self.seq // 4 or len(pairs) == 8:
                break
            pairs.append((name, value))
            budget -= cost
        if not pairs:
            return self.text()
        fill = self.filler * (budget // len(self.filler) + 1) if self.rng.random() < 0.5 else None
        if fill is None:
            fill = self.text()[0]
        fill = fill[:budget]
        # cut the filler into 2 * len(pairs) + 1 pieces: before each statement and each question
        cuts = sorted(self.rng.randrange(0, len(fill) + 1) for _ in range(2 * len(pairs)))
        pieces = [fill[a:b] for a, b in zip([0] + cuts, cuts + [len(fill)])]
        order = list(range(len(pairs)))
        self.rng.shuffle(order)
        tokens, weights, values = [], [], []
        for i, (name, value) in enumerate(pairs):
            tokens += pieces[i] + name + value
            weights += [1.0] * (len(pieces[i]) + len(name) + len(value))
            values.append((len(tokens) - len(value), len(tokens)))
        split = len(tokens)
        for j, i in enumerate(order):
            name, value = pairs[i]
            piece = pieces[len(pairs) + j]
            tokens += piece + name + value
            weights += [1.0] * (len(piece) + len(name)) + [self.answer_weight] * len(value)
        tokens, weights = tokens[: self.seq], weights[: self.seq]
        pad = self.seq - len(tokens)
        if pad:
            tokens = self.text()[0][:pad] + tokens
            weights = [1.0] * pad + weights
        self.last_twin = ([(pad + a, pad + b) for a, b in values if pad + b <= self.seq], min(pad + split, self.seq))
        return tokens, weights

    def positions(self, cut=None):
        """0..seq-1, or (PoSE) the same with a few random jumps, spanning up to max_position;
        with `cut`, one of the jumps is there (between a needle and its question)."""
        if self.rng.random() >= self.pose_share:
            return list(range(self.seq))
        span = int(math.exp(self.rng.uniform(math.log(self.seq), math.log(self.max_position))))
        cuts = sorted(self.rng.sample(range(1, self.seq), self.rng.randint(1, 3)))
        if cut is not None and 0 < cut < self.seq and cut not in cuts:
            cuts = sorted(cuts[1:] + [cut])
        extra = span - self.seq
        gaps = sorted(self.rng.randint(0, extra) for _ in cuts)
        gaps = [b - a for a, b in zip([0] + gaps[:-1], gaps)]
        pos, offset, ci = [], 0, 0
        for t in range(self.seq):
            if ci < len(cuts) and t == cuts[ci]:
                offset += gaps[ci]
                ci += 1
            pos.append(t + offset)
        return pos

    haystack_share = 0.0
    haystack_max = 1 << 21
    needle_jump_share = 0.0

    twin_share = 0.0

    def twin_of(self, tokens):
        """The twin of the row `passkey`, `copy` or `recall` just made (`tokens`), as the model's
        input (the last token is only a target), and the row where it takes over."""
        spans, split = self.last_twin
        return self.other_digits(tokens, spans)[:-1], split

    def batch(self, size):
        """tokens, weights, positions [size, seq]; the key bias [size, seq, seq] of the
        virtual haystack (None when no sequence of the batch has one); and the twins of the
        retrieval rows drawn to have one (`Yoco.forward`'s `twin`, for the model's input rows:
        the last token is only a target; None when none)."""
        toks, wts, poss, biases, twins = [], [], [], [], []
        for row in range(size):
            r = self.rng.random()
            hay, self.last_twin = None, None
            if r < self.passkey_share:
                t, w = self.passkey()
                hay = self.last_haystack
            elif r < self.passkey_share + self.copy_share:
                t, w = self.copy()
            elif r < self.passkey_share + self.copy_share + self.recall_share:
                t, w = self.recall()
            else:
                t, w = self.text()
            toks.append(t)
            wts.append(w if w is not None else [1.0] * self.seq)
            cut = None
            if hay is not None and self.rng.random() < self.needle_jump_share:
                cut = self.rng.randint(hay[2], hay[1])  # between the needle's end and the question
            poss.append(self.positions(cut))
            biases.append(self.haystack_bias(hay) if hay is not None and self.rng.random() < self.haystack_share else None)
            # drawn only when asked for, so that runs without twins keep their random stream
            if self.twin_share and self.last_twin is not None and self.rng.random() < self.twin_share:
                twins.append((row, *self.twin_of(t)))
        bias = None
        if any(b is not None for b in biases):
            bias = torch.stack([b if b is not None else torch.zeros(self.seq - 1, self.seq - 1) for b in biases])
        twin = None
        if twins:
            twin = (torch.tensor([r for r, _, _ in twins]), torch.tensor([t for _, t, _ in twins]),
                    torch.tensor([s for _, _, s in twins]))
        return torch.tensor(toks), torch.tensor(wts), torch.tensor(poss), bias, twin

    long_min, long_max, long_haystack_share, long_twin_share = 4096, 131072, 0.0, 0.0

    def long_passkey(self):
        """One passkey row of log-uniform length long_min..long_max (no text before it) for
        `long_rows.loss`: (tokens, weights, grad spans, tail row, key bias [len - 1] or None,
        the needle-free twin or None)."""
        length = int(math.exp(self.rng.uniform(math.log(self.long_min), math.log(self.long_max))))
        seq, short = self.seq, self.passkey_min
        self.seq = self.passkey_min = length
        try:
            tokens, weights = self.passkey()
        finally:
            self.seq, self.passkey_min = seq, short
        filler, q_start, needle_end = self.last_haystack
        needle_start = filler.index(False)
        tail = q_start - 1  # the row that predicts the question's first token
        spans = [(needle_start - 16, needle_end + 16), (tail, length - 1)]
        bias = None
        if self.rng.random() < self.long_haystack_share:
            bias = self.haystack_keys(filler, length - 1)
        twin = None
        if self.rng.random() < self.long_twin_share:
            n = needle_end - needle_start
            twin = tokens[:needle_start] + self.filler[:n] + tokens[needle_end:]
        return tokens, weights, spans, tail, bias, twin

    def haystack_keys(self, filler, t):
        """ln(N / n) on each of the first t keys that is one of the n distractors (`filler`),
        N drawn log-uniformly from n to haystack_max: the bias of one row of the haystack."""
        n = max(sum(filler), 1)
        big = math.exp(self.rng.uniform(math.log(n), math.log(max(self.haystack_max, n))))
        return torch.tensor(filler[:t], dtype=torch.float32) * math.log(big / n)

    def haystack_bias(self, hay):
        """The virtual haystack of one passkey sequence, as the model's input rows see it
        ([seq-1, seq-1]: the last token is only a target): the question's and answer's rows add
        ln(N / n) to the logits of the n distractor keys, N drawn log-uniformly from n to
        haystack_max: softmax then weighs them as N distractors."""
        filler, q_start, _ = hay
        t = self.seq - 1
        cols = self.haystack_keys(filler, t)
        rows = (torch.arange(t) >= q_start - 1).float()  # the row before the question's first token on
        return rows[:, None] * cols[None, :]


def loss_fn(model, tokens, weights, positions, key_bias=None, twin=None):
    logits = model(tokens[:, :-1], positions[:, :-1], key_bias, twin)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    sup = w > 1.0
    acc = (logits.reshape(-1, logits.shape[-1])[sup].argmax(-1) == tokens[:, 1:].reshape(-1)[sup]).float().mean()
    return (nll * w).sum() / w.sum(), nll.mean(), acc, w.sum()


@torch.no_grad()
def heldout_loss(model, data_dir, tok, seq):
    with open(os.path.join(data_dir, "heldout.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    eos = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids + [eos])
    n = (len(ids) - 1) // seq
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = torch.tensor([ids[j * seq : j * seq + seq + 1] for j in range(i, min(n, i + 8))])
        logits = model(rows[:, :-1], torch.arange(seq).expand(rows.shape[0], seq))
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum").item()
        count += rows[:, 1:].numel()
    return total / count


@torch.no_grad()
def passkey_accuracy(model, batches, n, length=None, cache_only=False):
    """Greedy accuracy (all five digits right) on fresh passkey sequences of `length` tokens
    (default: the training length; positions not skipped). `cache_only`: the question starts
    from the state of a twin with another key in the needle (`Yoco.forward`), so only a model
    that reads the key from the global K/V answers right."""
    hits, short, digits, seq = 0, batches.passkey_min, batches.key_digits_max, batches.seq
    # prompts from a random stream of their own: evaluating never moves the training stream, so
    # a resumed run draws the batches an uninterrupted one would
    train_rng, batches.rng = batches.rng, random.Random(length or seq)
    batches.seq = length or seq
    batches.passkey_min, batches.key_digits_max = batches.seq, 5
    for _ in range(n):
        tokens, weights = batches.passkey()
        t = torch.tensor([tokens])
        twin = None
        if cache_only:
            twin_tokens, split = batches.twin_of(tokens)
            twin = (torch.tensor([0]), torch.tensor([twin_tokens]), torch.tensor([split]))
        logits = model(t[:, :-1], torch.arange(len(tokens) - 1)[None], twin=twin)[0]
        idx = [i for i, w in enumerate(weights) if w > 1.0]
        pred = logits[[i - 1 for i in idx]].argmax(-1)
        hits += int(torch.equal(pred, t[0, idx]))
    batches.passkey_min, batches.key_digits_max, batches.seq = short, digits, seq
    batches.rng = train_rng
    return hits / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--max-position", type=int, default=1 << 20)
    ap.add_argument("--passkey-share", type=float, default=0.3)
    ap.add_argument("--pose-share", type=float, default=0.5)
    ap.add_argument("--passkey-min", type=int, default=None,
                    help="passkey tasks of log-uniform length from this to --seq, after text (default: all --seq long)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--key-digits-max", type=int, default=5,
                    help="passkeys of 5 to this many digits in training (evaluation keeps 5)")
    ap.add_argument("--copy-share", type=float, default=0.0,
                    help="share of the batch that is the copy task (a digit string repeated after filler)")
    ap.add_argument("--recall-share", type=float, default=0.0,
                    help="share of the batch that is multi-query associative recall (names and digit strings)")
    ap.add_argument("--eval-passkey-lengths", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also evaluate passkey retrieval at these lengths (comma-separated)")
    ap.add_argument("--answer-weight", type=float, default=20.0, help="loss weight of the passkey answer")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps of the --steps schedule (the shipped run's first phase)")
    ap.add_argument("--init", help="start from this run's model.safetensors instead of random weights "
                    "(a second phase; the first phase's training.json is kept beside it)")
    ap.add_argument("--haystack-share", type=float, default=0.0,
                    help="share of passkey sequences trained with a virtual haystack (see Batches.haystack_bias)")
    ap.add_argument("--haystack-max", type=int, default=1 << 21, help="the largest virtual haystack, in tokens")
    ap.add_argument("--needle-jump-share", type=float, default=0.0,
                    help="share of passkey sequences whose positions jump (PoSE, when drawn) between needle and question")
    ap.add_argument("--eval-tail-lengths", default="",
                    help="also evaluate needle's passkey prompts tail-only (eval_tail.py) at these lengths, e.g. 4K,16K")
    ap.add_argument("--eval-tail-trials", type=int, default=8)
    ap.add_argument("--long-rows", type=int, default=0,
                    help="passkey rows of --long-min..--long-max tokens per step, trained tail-only (long_rows.py)")
    ap.add_argument("--long-min", type=int, default=4096)
    ap.add_argument("--long-max", type=int, default=131072)
    ap.add_argument("--long-haystack-share", type=float, default=0.0,
                    help="share of long rows trained with a virtual haystack of up to --haystack-max tokens")
    ap.add_argument("--long-twin-share", type=float, default=0.0,
                    help="share of long rows whose question starts from the retention state of the row without its "
                    "needle (long_rows.loss: the answer must come from the global K/V)")
    ap.add_argument("--twin-share", type=float, default=0.0,
                    help="share of the batch's retrieval rows (passkey, copy, recall) whose answer part starts from "
                    "the retention state of a twin with other digits in place of the answer (Yoco.forward's twin: "
                    "the answer can only come from the global K/V)")
    ap.add_argument("--long-kv-grad", choices=["all", "spans"], default="all",
                    help="the K/V projections' gradient from every position of a long row, or only from its spans")
    ap.add_argument("--long-weight", type=float, default=1.0,
                    help="weight of a long row's tokens beside the batch's (1: as if a row of the batch)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="write checkpoint.pt (weights, optimizer, random states) every this many steps "
                    "(default: at every evaluation); a run started again with the same --out resumes from it")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = Tokenizer.from_file(os.path.join(args.data, "tokenizer.json"))
    cfg = config(tok.get_vocab_size())
    model = Yoco(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    if args.init:
        model.load_official(load_file(args.init))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {json.dumps(cfg)}", flush=True)
    err = check_against_reference(model, torch.randint(0, cfg["vocab_size"], (150,), generator=torch.Generator().manual_seed(1)))
    print(f"batched model vs reference (float64): max |logit diff| {err:.2e}", flush=True)
    assert err < 1e-9, err
    if args.twin_share:
        err = long_rows.check_twin(model)
        print(f"twin rows vs the served forward from the twin's states (float64): max |logit diff| {err:.2e}", flush=True)
        assert err < 1e-9, err
    if args.long_rows:
        err, gerr = long_rows.check(model)
        print(f"long rows vs the full forward (float64): max |logit diff| {err:.2e}, gradients {gerr:.2e}", flush=True)
        assert err < 1e-9 and gerr < 1e-9, (err, gerr)

    batches = Batches(args.data, tok, args.seq + 1, rng, args.max_position, args.passkey_share, args.pose_share,
                      args.passkey_min)
    batches.answer_weight = args.answer_weight
    batches.key_digits_max = args.key_digits_max
    batches.copy_share = args.copy_share
    batches.recall_share = args.recall_share
    batches.haystack_share, batches.haystack_max = args.haystack_share, args.haystack_max
    batches.needle_jump_share = args.needle_jump_share
    batches.long_min, batches.long_max = args.long_min, args.long_max
    batches.long_haystack_share = args.long_haystack_share
    batches.long_twin_share = args.long_twin_share
    batches.twin_share = args.twin_share
    print(f"train stream: {len(batches.stream)} tokens", flush=True)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() == 1 or name == "embed_tokens.weight" else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    log = {"args": vars(args), "config": cfg, "n_params": n_params, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "steps": []}
    if args.init:
        here = os.path.dirname(os.path.abspath(args.init))
        for name in ("train_log.json", "training.json"):  # a run's directory, or an exported model
            if os.path.exists(os.path.join(here, name)):
                with open(os.path.join(here, name)) as f:
                    log["previous_phase"] = json.load(f)
                break
    os.makedirs(args.out, exist_ok=True)
    first = 0
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt_path):
        first, log = resume(ckpt_path, model, opt, rng, args)
        print(f"resumed from {ckpt_path} at step {first}", flush=True)
    tail_lengths = [eval_tail.parse_len(x) for x in args.eval_tail_lengths.split(",") if x]
    t0 = time.time() - (log["steps"][-1]["elapsed_s"] if first and log["steps"] else 0.0)
    last = min(args.steps, args.stop_after or args.steps) - 1
    every = args.checkpoint_every or args.eval_every
    tokens_seen = log.get("tokens_seen", first * args.batch * args.seq)
    for step in range(first, last + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        tokens, weights, positions, key_bias, twin = batches.batch(args.batch)
        opt.zero_grad(set_to_none=True)
        loss, lm, acc, weight = loss_fn(model, tokens, weights, positions, key_bias, twin)
        loss.backward()
        long_hits, long_tokens = [], 0
        for _ in range(args.long_rows):
            # one row at a time, its graph freed before the next: a row of 128K keeps ~1 GB
            t, w, spans, tail, bias, twin = batches.long_passkey()
            lr_sum, hit = long_rows.loss(model, t, w, spans, tail, bias, args.long_kv_grad == "all", twin)
            # a long row's tail weighs as a row of the batch: its weighted sum over the batch's
            # weight. (As a mean of its own, ~20 tokens against the batch's 4096, it outweighed
            # the text ~100x and unlearned the copy at every length within 200 steps.)
            (lr_sum * args.long_weight / weight).backward()
            long_hits.append(hit)
            long_tokens += len(t)
        tokens_seen += args.batch * args.seq + long_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == last:
            el = time.time() - t0
            tps = tokens_seen / el
            longs = f" long-hits {sum(long_hits)}/{len(long_hits)} ({long_tokens} tok)" if long_hits else ""
            print(f"step {step} loss {loss.item():.4f} lm {lm.item():.4f} answer-acc {acc.item():.3f}{longs} "
                  f"lr {lr_at(step):.2e} {el:.0f}s {tps:.0f} tok/s", flush=True)
            log["steps"].append({"step": step, "loss": loss.item(), "lm": lm.item(), "answer_acc": acc.item(),
                                 "elapsed_s": el, "tokens": tokens_seen})
            if long_hits:
                log["steps"][-1].update({"long_hits": sum(long_hits), "long_tokens": long_tokens})
        if (step + 1) % args.eval_every == 0 or step == last:
            model.eval()
            held = heldout_loss(model, args.data, tok, args.seq)
            acc = passkey_accuracy(model, batches, 32)
            cache_acc = passkey_accuracy(model, batches, 32, cache_only=True)
            long = {n: passkey_accuracy(model, batches, 16, n + 1) for n in args.eval_passkey_lengths}
            long_cache = {n: passkey_accuracy(model, batches, 16, n + 1, cache_only=True)
                          for n in args.eval_passkey_lengths}
            tail = {n: needle_accuracy(model, tok, n, args.eval_tail_trials) for n in tail_lengths}
            model.train()
            print(f"eval step {step}: heldout loss {held:.4f} (ppl {math.exp(held):.2f}), "
                  f"passkey@{args.seq} {acc:.2f} (cache only {cache_acc:.2f})"
                  + "".join(f", passkey@{n} {a:.2f} (cache only {long_cache[n]:.2f})" for n, a in long.items())
                  + "".join(f", needle@{n} {a:.2f}" for n, a in tail.items()),
                  flush=True)
            log["steps"][-1].update({"heldout_loss": held, "passkey_acc": acc, "passkey_cache_only_acc": cache_acc,
                                     "passkey_acc_at": {str(n): a for n, a in long.items()},
                                     "passkey_cache_only_acc_at": {str(n): a for n, a in long_cache.items()},
                                     "needle_acc_at": {str(n): a for n, a in tail.items()}})
            save(model, tok, cfg, args.out, log)
        if (step + 1) % every == 0 or step == last:
            log["tokens_seen"] = tokens_seen
            checkpoint(ckpt_path, model, opt, rng, step + 1, log)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


def needle_accuracy(model, tok, length, trials):
    """The share of needle's passkey prompts of `length` tokens answered right (tail-only)."""
    rng = (1 * 0x9E3779B97F4A7C15 & eval_tail.MASK64) | 1
    cases, _ = eval_tail.trials(tok, length, trials, rng)
    return sum(eval_tail.run_trial(model, p, a, 16384)[0] for p, a, _, _ in cases) / len(cases)


def checkpoint(path, model, opt, rng, step, log):
    """Everything a resumed run needs to go on as if never stopped: the weights, the optimizer's
    moments, every random state and the log; written to a temporary name, then renamed."""
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
             "torch_rng": torch.get_rng_state(), "log": log}
    torch.save(state, path + ".partial")
    os.replace(path + ".partial", path)


def resume(path, model, opt, rng, args):
    state = torch.load(path, weights_only=False)
    saved = state["log"]["args"]
    for key in ("seed", "steps", "seq", "batch", "lr"):
        if saved.get(key) != getattr(args, key):
            raise SystemExit(f"{path}: --{key} was {saved.get(key)}, now {getattr(args, key)}: not the same run")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["log"]


def save(model, tok, cfg, out, log):
    save_file(model.state_dict_official(), os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
