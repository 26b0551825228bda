"""Top-k fill-mask from the command line.

    python infer.py --model DIR "The capital of France is [MASK]."
    python infer.py --model DIR --top-k 3 --targets paris london "The capital of France is [MASK]."
    python infer.py --model DIR --json --file texts.txt        # one text per line; "-" reads stdin
    echo "Hello [MASK]!" | python infer.py --model DIR

`[MASK]` and `<mask>` both work whatever the model's own mask token is. `--json` prints exactly what
`transformers.pipeline("fill-mask")` returns: the result for one text, a list of results for several.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

import mlm
from mlm.errors import InputError, run_cli
from mlm.fillmask import fill_mask
from mlm.model import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Predict the masked words of texts with a BERT-family model.")
    p.add_argument("texts", nargs="*", help="texts with [MASK] or <mask>; none: read --file or stdin")
    p.add_argument("--model", required=True, help="local Hugging Face-format model folder")
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    p.add_argument("--targets", nargs="+", help="score only these words (comma-separated or several arguments)")
    p.add_argument("--file", help="read texts from this file, one per line ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the pipeline's JSON structure")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="weights' precision; bf16 is several times faster on CPUs with bf16 units (scores differ ~1e-3)")
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args(argv)


def read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file:
        try:
            stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read --file {args.file!r}: {e.strerror}") from None
        with stream:
            texts += [line.rstrip("\n") for line in stream if line.strip()]
    elif not texts and not sys.stdin.isatty():
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no text given; pass texts as arguments, --file FILE, or pipe them on stdin")
    return texts


def print_table(texts: list[str], results: list) -> None:
    for text, result in zip(texts, results):
        print(text)
        per_mask = result if result and isinstance(result[0], list) else [result]
        for m, candidates in enumerate(per_mask, 1):
            if len(per_mask) > 1:
                print(f"  mask {m} of {len(per_mask)}:")
            width = max(len(c["token_str"]) for c in candidates)
            for rank, c in enumerate(candidates, 1):
                print(f"  {rank:>2}. {c['token_str']:<{width}}  {c['score']:.4f}  {c['sequence']}")
        print()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="note: %(message)s")
    texts = read_texts(args)
    targets = [w for t in args.targets for w in t.split(",") if w] if args.targets else None
    model, tokenizer = mlm.load_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype])
    results = fill_mask(model, tokenizer, texts, top_k=args.top_k, targets=targets, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(results[0] if len(texts) == 1 else results, indent=2, ensure_ascii=False))
    else:
        print_table(texts, results)


if __name__ == "__main__":
    run_cli(main)
