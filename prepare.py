"""Tokenize a corpus into a dataset folder that train.py reads, or preview masked blocks of one.

    python prepare.py --tokenizer MODEL_DIR --out data/stdlib          # the built-in corpus
    python prepare.py --data corpus/ --train-tokenizer wordpiece --vocab-size 8192 --out data/mine
    python prepare.py --train-tokenizer unigram --vocab-size 8000 --out data/unigram  # DeBERTa
    python prepare.py --data eli5.jsonl --text-field answers.text --tokenizer MODEL --out data/eli5
    python prepare.py --preview data/stdlib -n 3 --whole-word-mask   # with train.py's flags

With no --data the corpus is the Python standard library's docstrings (no download). The folder
format is described at the top of mlm/data.py; the formats read, at the top of mlm/corpus.py.

--preview shows the masks training would use: it takes train.py's settings (--preset, --config, and
any of its flags: --seed, --block-size, --mlm-probability, --whole-word-mask, --static-masking, ...)
and builds the blocks through the training pipeline's own function, the first blocks of step 0 (or
of the fixed validation set with --split val)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from mlm.errors import ConfigError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="files, folders or globs (default: stdlib docstrings)",
    )
    p.add_argument("--out", metavar="DIR", help="dataset folder to write")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="DIR", help="use the tokenizer of this model folder")
    tok.add_argument(
        "--train-tokenizer",
        choices=("wordpiece", "bpe", "unigram"),
        help="train a tokenizer on the corpus: BERT's WordPiece, RoBERTa's byte-level BPE or "
        "DeBERTa-v3's SentencePiece-style unigram",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        help="for --train-tokenizer (default 30522 wordpiece, 50265 bpe, 128000 unigram)",
    )
    p.add_argument(
        "--cased",
        action="store_true",
        help="for --train-tokenizer wordpiece: keep case (bpe and unigram always keep it, as "
        "RoBERTa "
        "and DeBERTa-v3 do)",
    )
    p.add_argument(
        "--text-field",
        default="text",
        help="JSON/parquet field with the text; dotted paths reach in",
    )
    p.add_argument(
        "--doc-split",
        default="blank",
        choices=("blank", "file", "line"),
        help="text files: documents end at blank lines, at the end of the file, or at each line",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents kept for validation"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the train/val split")
    p.add_argument("--batch-docs", type=int, default=2000, help="documents tokenized per batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--preview",
        metavar="DIR",
        help="print a few masked blocks of a prepared folder instead, "
        "masked as train.py would with the train.py flags that follow",
    )
    return p.parse_args(argv)


def parse_preview(argv: list[str]) -> tuple[argparse.Namespace, object]:
    """--preview's own options, and train.py's config from every other flag."""
    from mlm.config import parse_config

    p = argparse.ArgumentParser(
        description="preview masked blocks, as train.py masks them", add_help=False
    )
    p.add_argument("--preview", metavar="DIR", required=True)
    p.add_argument(
        "--split",
        default="train",
        choices=("train", "val"),
        help="step 0's blocks, or validation's",
    )
    p.add_argument("-n", type=int, default=3, help="how many blocks")
    args, rest = p.parse_known_args(argv)
    return args, parse_config([*rest, "--data", args.preview])


def prepare_main(args: argparse.Namespace) -> None:
    from mlm.corpus import Corpus, default_corpus
    from mlm.dataset import prepare
    from mlm.tokenizer import Tokenizer
    from mlm.tokenizer_train import train_tokenizer

    if not args.out:
        raise ConfigError("pass --out DIR for the dataset folder (or --preview DIR to look at one)")
    if not args.tokenizer and not args.train_tokenizer:
        raise ConfigError(
            "pass --tokenizer MODEL_DIR, or --train-tokenizer wordpiece|bpe|unigram to learn one "
            "from the corpus"
        )
    if (args.vocab_size or args.cased) and not args.train_tokenizer:
        raise ConfigError("--vocab-size and --cased only apply with --train-tokenizer")
    if args.cased and args.train_tokenizer != "wordpiece":
        raise ConfigError(f"--cased applies to wordpiece; {args.train_tokenizer} always keeps case")

    corpus = (
        Corpus(args.data, text_field=args.text_field, doc_split=args.doc_split)
        if args.data
        else default_corpus()
    )
    started = time.perf_counter()
    if args.tokenizer:
        tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    else:
        if not args.quiet:
            print(
                f"training a {args.train_tokenizer} tokenizer on {corpus.description} ...",
                file=sys.stderr,
            )
        # None: the family's own choice (WordPiece lower-cases)
        lowercase = False if args.cased else None
        tokenizer = train_tokenizer(
            corpus, args.train_tokenizer, args.vocab_size, lowercase=lowercase
        )
    meta = prepare(
        corpus,
        args.out,
        tokenizer,
        val_fraction=args.val_fraction,
        seed=args.seed,
        batch_docs=args.batch_docs,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - started
    print(summary(meta, args.out, seconds))


def summary(meta: dict, out: str, seconds: float) -> str:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    bad = "no undecodable bytes"
    if meta["bad_bytes"]:
        bad = (
            f"{meta['bad_bytes']:,} undecodable byte sequence(s) on {meta['bad_lines']:,} line(s) "
            "replaced "
            f"by U+FFFD (first in {meta['bad_bytes_file']})"
        )
    skipped = (
        f", {meta['skipped_records']:,} records without text skipped"
        if meta["skipped_records"]
        else ""
    )
    return (
        f"Prepared {meta['docs']:,} documents ({meta['tokens']:,} tokens) from {meta['source']} "
        f"into {out}: "
        f"train {train['docs']:,} docs / {train['tokens']:,} tokens, "
        f"val {val['docs']:,} docs / {val['tokens']:,} tokens; "
        f"{bad}{skipped}. {meta['tokenizer_kind']} tokenizer, vocabulary {meta['vocab_size']:,} "
        f"(sha256 {meta['tokenizer_sha256'][:12]}), ids stored as {meta['dtype']}. "
        f"Took {seconds:.1f} s ({meta['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)."
    )


def preview_main(argv: list[str]) -> None:
    from mlm.data import BatchPlan, PackedBlocks
    from mlm.dataset import load_dataset_meta
    from mlm.masking import preview
    from mlm.pipeline import Masking, assemble, validation_set
    from mlm.tokenizer import Tokenizer

    args, cfg = parse_preview(argv)
    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, not {args.n}")
    tokenizer = Tokenizer.from_pretrained(args.preview)
    masking = Masking.of(cfg, tokenizer)
    if args.split == "val":
        cfg.eval_blocks = min(cfg.eval_blocks, args.n)
        batch = validation_set(cfg, args.preview, masking)
    else:
        # Whole blocks as training sees them; a split shorter than one block is shown padded.
        whole = load_dataset_meta(args.preview)["splits"]["train"]["tokens"] >= cfg.block_size
        blocks = PackedBlocks(
            args.preview, "train", cfg.block_size, remainder="drop" if whole else "pad"
        )
        n = min(args.n, len(blocks))
        # Step 0 of a global batch of n: the first n blocks of the training stream, with their
        # masks, the same blocks and masks as the first n of step 0 at any global batch size.
        plan = BatchPlan(len(blocks), n, seed=cfg.seed)
        batch = assemble(0, plan, blocks, masking, seed=cfg.seed, doc_attention=False)[0]
    print(
        preview(
            tokenizer.decode,
            batch.input_ids,
            batch.labels,
            mask_token=tokenizer.mask_token,
            n=args.n,
        )
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--preview" or a.startswith("--preview=") for a in argv):
        preview_main(argv)
    else:
        prepare_main(parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # encode_batch on every core
    run_cli(main)
