"""Builds the training corpus and the tokenizer of yoco's built-in model, offline-reproducibly.

Text comes from Debian packages (fetched with `apt-get download`, unpacked with `dpkg-deb`, so
nothing is installed):

* bible-kjv-text (+ bible-kjv, its reader program): the King James Version, public domain
  (the translation's copyright expired; the packaging is "unrestricted use").
* fortunes, fortunes-min: the fortune-mod quotation files, BSD licence (fortunes-off, the
  offensive set, is not used).
* jargon-text: the Jargon File 4.4.7, public domain.

Documents are split 98/2 into train and held-out by a hash of their index (seeded), written one
per line as JSON strings to OUT/train.jsonl and OUT/heldout.jsonl. A byte-level BPE tokenizer
(vocabulary 2048, digits split one per token so a passkey is a sequence of single digits) is
trained on the train split and saved as OUT/tokenizer.json, which yoco's `tokenizers` loads.

    python tools/train/prepare_data.py --out target/train-data
"""

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import tempfile

PACKAGES = ["bible-kjv-text", "bible-kjv", "fortunes", "fortunes-min", "jargon-text"]
VOCAB_SIZE = 2048
EOS = "<|endoftext|>"


def fetch_packages(work):
    debs = os.path.join(work, "debs")
    root = os.path.join(work, "root")
    os.makedirs(debs, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    for name in sorted(os.listdir(debs)):
        if name.endswith(".deb"):
            subprocess.run(["dpkg-deb", "-x", os.path.join(debs, name), root], check=True)
    return root


def paragraphs(text):
    """Blank-line separated paragraphs, each rewrapped onto one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        line = " ".join(block.split())
        if line:
            out.append(line)
    return out


def kjv_documents(root):
    """One document per chapter: 'Genesis 1' then its verses as running prose."""
    text = subprocess.run(
        [os.path.join(root, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"), "Gen1:1-Rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    docs = []
    for chapter in re.split(r"\n(?=\S[^\n]* \d+\n\n)", text.strip()):
        lines = chapter.strip().split("\n")
        title, body = lines[0].strip(), " ".join(lines[1:])
        verses = re.split(r"\s+\d+ ", " " + body)
        prose = " ".join(" ".join(v.split()) for v in verses if v.strip())
        if prose:
            docs.append(f"{title}\n{prose}")
    return docs


def fortune_documents(root):
    base = os.path.join(root, "usr/share/games/fortunes")
    docs = []
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if "." in name or os.path.isdir(path):
            continue  # .dat indexes, .u8 links
        with open(path, encoding="utf-8", errors="replace") as f:
            for item in f.read().split("\n%\n"):
                item = item.strip("%\n ")
                if len(item) > 20:
                    docs.append(item)
    return docs


def jargon_documents(root):
    with gzip.open(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read()
    # keep prose paragraphs; drop box-drawing tables and very short lines
    paras = [p for p in paragraphs(text) if len(p) > 60 and not re.search("[\u2500-\u257f]", p)]
    # group paragraphs into documents of ~2-4 KB
    docs, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c) for c in cur) > 3000:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def train_tokenizer(texts, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261201)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        root = fetch_packages(work)
        sources = {
            "kjv": kjv_documents(root),
            "fortunes": fortune_documents(root),
            "jargon": jargon_documents(root),
        }
    rng = random.Random(args.seed)
    train, heldout = [], []
    for name, docs in sources.items():
        print(f"{name}: {len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.2f} MB")
        for d in docs:
            (heldout if rng.random() < 0.02 else train).append(d)
    rng.shuffle(train)
    for split, docs in (("train", train), ("heldout", heldout)):
        with open(os.path.join(args.out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
    tok = train_tokenizer(train, os.path.join(args.out, "tokenizer.json"))
    sample = train[0][:2000]
    ids = tok.encode(sample).ids
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {len(sample) / len(ids):.2f} chars/token on a sample")
    assert tok.decode(ids) == sample, "tokenizer does not round-trip"
    print(f"train {len(train)} docs, heldout {len(heldout)} docs -> {args.out}")


if __name__ == "__main__":
    main()
