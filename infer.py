"""Top-k fill-mask from the command line, or a model's masked-LM loss over a corpus.

    python infer.py --model DIR "The capital of France is [MASK]."
    python infer.py --model DIR --top-k 3 --targets paris london "The capital of France is [MASK]."
    python infer.py --model DIR --json --file texts.txt        # one text per line; "-" reads stdin
    echo "Hello [MASK]!" | python infer.py --model DIR
    python infer.py --model DIR --eval corpus/ --json          # loss, perplexity, accuracy
    python infer.py --model DIR --eval runs/tiny/data --split val --reference transformers

Fill-mask: `[MASK]` and `<mask>` both work whatever the model's own mask token is. `--json` prints
exactly what `transformers.pipeline("fill-mask")` returns: the result for one text, a list of
results for several.

--eval: the text is read as train.py reads --data (files, folders, globs, a `datasets` folder) and
tokenized with the model's tokenizer into a temporary folder with val_fraction=0, so every document
is scored (prepare.py it once to score it often). A folder made by prepare.py is used as it is: its
train blocks, then its val blocks (--split picks one). Each split is packed as train.py packs its
validation set (documents end to end, the last block padded), masked once by `mask_eval_blocks` from
--seed (block i's mask depends on (seed, i) only; val blocks are numbered on after the train blocks)
and scored by the loop of train.py's validation (mlm/evaluate.py). So `--split val --seed S
--block-size B --max-blocks N` on a run's data folder gives the validation numbers train.py logs
with --seed S --block-size B --eval-blocks N. `--json` prints one object: loss, perplexity,
accuracy, tokens (masked tokens scored), blocks, input_tokens, the settings, and with --reference
the same three numbers from transformers."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import mlm
from mlm import data as mdata
from mlm import dataset as mdataset
from mlm.corpus import DOC_SPLITS, Corpus
from mlm.data import Batch
from mlm.errors import CheckpointError, ConfigError, DataError, InputError, run_cli
from mlm.evaluate import full_logits, score_blocks, summarize
from mlm.fillmask import fill_mask
from mlm.hf import state_dict_to_hf
from mlm.masking import mask_eval_blocks
from mlm.model import DTYPES, MaskedLM

# transformers computes logits at every position, (B, T, V) floats: keep B small
REFERENCE_BATCH = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Predict the masked words of texts with a BERT-family model, or score "
        "a corpus with --eval."
    )
    p.add_argument(
        "texts", nargs="*", help="texts with [MASK] or <mask>; none: read --file or stdin"
    )
    p.add_argument("--model", required=True, help="local Hugging Face-format model folder")
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    p.add_argument(
        "--targets", nargs="+", help="score only these words (comma-separated or several arguments)"
    )
    p.add_argument("--file", help="read texts from this file, one per line ('-' for stdin)")
    p.add_argument(
        "--json", action="store_true", help="print the pipeline's JSON (with --eval: one object)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="fp32",
        help="weights' precision; bf16 is several times faster on CPUs with bf16 units (scores "
        "differ ~1e-3)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    ev = p.add_argument_group(
        "--eval", "masked-LM loss, perplexity = exp(loss) and accuracy over a corpus"
    )
    ev.add_argument(
        "--eval",
        nargs="+",
        metavar="DATA",
        help="txt/jsonl/json/parquet/arrow files, folders, globs, a datasets folder or a "
        "prepare.py folder",
    )
    ev.add_argument(
        "--split",
        choices=("all", "train", "val"),
        default="all",
        help="of a prepare.py folder: both splits (default), or one",
    )
    ev.add_argument(
        "--block-size",
        type=int,
        help="tokens per block (default: 128, or the model's limit if smaller)",
    )
    ev.add_argument(
        "--mlm-probability", type=float, default=0.15, help="share of tokens masked (default 0.15)"
    )
    ev.add_argument("--whole-word-mask", action="store_true", help="mask whole words")
    ev.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the masks, and the fresh MLM head of a checkpoint without one (default 0)",
    )
    ev.add_argument(
        "--text-field",
        default="text",
        help="JSON/parquet/arrow field of the text; dotted paths reach in",
    )
    ev.add_argument(
        "--doc-split", choices=DOC_SPLITS, default="blank", help="where documents end in text files"
    )
    ev.add_argument("--max-blocks", type=int, help="score only the first N blocks")
    ev.add_argument(
        "--reference",
        choices=("transformers",),
        help="also score the same masked blocks with transformers' AutoModelForMaskedLM",
    )
    return p.parse_args(argv)


def read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file == "-" or (not args.file and not texts and not sys.stdin.isatty()):
        texts += lines_of(sys.stdin.buffer.read(), "standard input")
    elif args.file:
        try:
            data = Path(args.file).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read --file {args.file!r}: {e.strerror}") from None
        texts += lines_of(data, f"--file {args.file!r}")
    if not texts:
        raise InputError(
            "no text given; pass texts as arguments, --file FILE, or pipe them on stdin"
        )
    return texts


def lines_of(data: bytes, name: str) -> list[str]:
    """The non-blank lines of UTF-8 text; a line in another encoding is an InputError naming it."""
    lines = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise InputError(
                f"{name} is not UTF-8 text (line {number} has byte 0x{line[e.start]:02x}); convert "
                "it, "
                "for example with iconv -f latin1 -t utf-8"
            ) from None
        if text.strip():
            lines.append(text)
    return lines


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


def fill_mask_main(args: argparse.Namespace) -> None:
    texts = read_texts(args)
    targets = [w for t in args.targets for w in t.split(",") if w] if args.targets else None
    model, tokenizer = mlm.load_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype])
    results = fill_mask(
        model, tokenizer, texts, top_k=args.top_k, targets=targets, batch_size=args.batch_size
    )
    if args.json:
        print(json.dumps(results[0] if len(texts) == 1 else results, indent=2, ensure_ascii=False))
    else:
        print_table(texts, results)


# =========================================================================================== --eval
def eval_main(args: argparse.Namespace) -> None:
    check_eval_args(args)
    # A checkpoint without an MLM head (all-MiniLM-L6-v2) gets a fresh one: drawn from --seed, so
    # runs repeat.
    torch.manual_seed(args.seed)
    model, tokenizer = mlm.load_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype])
    block_size = args.block_size or min(128, model.config.max_tokens)
    mdata.check_block_size(block_size, model.config.max_tokens, "usable positions")
    reference = (
        load_reference(args.model, model, DTYPES[args.dtype], args.device)
        if args.reference
        else None
    )
    with tempfile.TemporaryDirectory(prefix="mlm-eval-") as tmp:
        data_dir, source = prepared_data(args, tokenizer, Path(tmp) / "data")
        names = mdataset.SPLITS if args.split == "all" else (args.split,)
        meta = mdataset.load_dataset_meta(data_dir)
        splits = [
            mdata.PackedBlocks(data_dir, name, block_size, remainder="pad")
            for name in names
            if meta["splits"][name]["tokens"] or args.split != "all"
        ]
        ours, theirs, blocks, input_tokens = score_corpus(args, tokenizer, splits, model, reference)
    if ours[2] == 0:
        raise DataError(
            f"no token of {source} could be masked (only special tokens?); check --eval and "
            "--text-field"
        )
    result = {
        **summarize(ours),
        "blocks": blocks,
        "input_tokens": input_tokens,
        "model": args.model,
        "data": source,
        "split": args.split,
        "block_size": block_size,
        "seed": args.seed,
        "mlm_probability": args.mlm_probability,
        "whole_word_mask": args.whole_word_mask,
        "dtype": args.dtype,
    }
    if reference is not None:
        result["reference"] = {k: v for k, v in summarize(theirs).items() if k != "tokens"}
    print(json.dumps(result, indent=2) if args.json else eval_summary(result))


def check_eval_args(args: argparse.Namespace) -> None:
    if args.texts or args.file:
        raise ConfigError("--eval scores a corpus; pass texts to fill in without --eval")
    for name in ("batch_size", "block_size", "max_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if not 0 < args.mlm_probability < 1:
        raise ConfigError(f"--mlm-probability must be between 0 and 1, not {args.mlm_probability}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, not {args.seed}")


def prepared_data(
    args: argparse.Namespace, tokenizer: mlm.Tokenizer, scratch: Path
) -> tuple[Path, str]:
    """A prepared dataset folder of the --eval data and where its text came from: the folder itself
    when --eval names one made by prepare.py (checked against the model's vocabulary), else the text
    tokenized into `scratch` with every document in the train split."""
    if len(args.eval) == 1 and (Path(args.eval[0]) / "meta.json").is_file():
        meta = mdataset.load_dataset_meta(args.eval[0])
        mdataset.check_vocab(meta, tokenizer)
        return Path(args.eval[0]), f"{args.eval[0]} (prepared from {meta['source']})"
    if args.split == "val":
        raise ConfigError("--split val needs a folder made by prepare.py; raw text is scored whole")
    corpus = Corpus(args.eval, text_field=args.text_field, doc_split=args.doc_split)
    mdataset.prepare(corpus, scratch, tokenizer, val_fraction=0.0)
    return scratch, corpus.description


def score_corpus(
    args: argparse.Namespace,
    tokenizer: mlm.Tokenizer,
    splits: list[mdata.PackedBlocks],
    model: MaskedLM,
    reference,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Mask the splits' blocks a batch at a time and score them with the model (and the reference):
    (our sums, the reference's sums, blocks scored, real tokens in them); sums as mlm.evaluate
    returns."""
    masking = dict(
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=tokenizer.vocab_size,
        special_ids=tokenizer.special_ids,
        mlm_probability=args.mlm_probability,
    )
    total = sum(len(blocks) for blocks in splits)
    n = min(total, args.max_blocks or total)
    ours, theirs = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    first, input_tokens = 0, 0  # first: the number of the split's first block, which seeds its mask
    with tqdm(total=n, desc="scoring", unit=" blocks", file=sys.stderr, dynamic_ncols=True) as bar:
        for blocks in splits:
            for start in range(0, min(len(blocks), n - first), args.batch_size):
                # (B,)
                index = np.arange(start, min(start + args.batch_size, len(blocks), n - first))
                block = blocks.get(index)
                masked, labels = mask_eval_blocks(
                    block["input_ids"],
                    seed=args.seed,
                    block_indices=torch.from_numpy(first + index),
                    attention_mask=block["attention_mask"],
                    word_starts=block["word_starts"] if args.whole_word_mask else None,
                    **masking,
                )
                # Attention spans the whole block (no doc_ids), as train.py's default and
                # transformers'.
                batch = Batch(masked, labels, block["attention_mask"])
                ours += score_blocks(model, batch, batch_size=args.batch_size).cpu()
                if reference is not None:
                    theirs += score_blocks(
                        reference,
                        batch,
                        batch_size=min(args.batch_size, REFERENCE_BATCH),
                        logits_fn=full_logits,
                    ).cpu()
                input_tokens += int(block["attention_mask"].sum())
                bar.update(len(index))
            first += len(blocks)
    return ours, theirs, n, input_tokens


def load_reference(model_dir: str, ours: MaskedLM, dtype: torch.dtype, device: str):
    """transformers' AutoModelForMaskedLM of the same folder, on the same device and in the same
    dtype.

    A checkpoint without an MLM head (all-MiniLM-L6-v2 is a bare encoder) leaves both libraries to
    draw a fresh head from their own random numbers, and two random heads make two unrelated losses.
    So the reference takes our head's weights (converted by our table) for exactly the keys
    transformers reports missing; the encoder, which holds every real weight, is still each
    library's own reading of the file."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "--reference transformers needs the transformers package: pip install transformers"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        reference, info = transformers.AutoModelForMaskedLM.from_pretrained(
            model_dir, dtype=dtype, output_loading_info=True
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"transformers cannot load {model_dir}: {str(e).splitlines()[0]}"
        ) from None
    fresh = set(info["missing_keys"])
    if fresh:
        converted = state_dict_to_hf(ours)
        if not fresh & converted.keys():
            raise CheckpointError(
                f"transformers initialised {', '.join(sorted(fresh))} afresh in {model_dir}, "
                "which mlm's model has no counterpart of; the reference would not be comparable"
            )
        # Keys transformers ties to others (decoder.weight, decoder.bias) follow what they are tied
        # to.
        reference.load_state_dict({k: v for k, v in converted.items() if k in fresh}, strict=False)
    return reference.to(device).eval()


def eval_summary(r: dict) -> str:
    lines = [
        f"{r['model']}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  accuracy "
        f"{r['accuracy']:.4f}",
        f"  {r['tokens']:,} masked tokens in {r['blocks']:,} blocks of {r['block_size']} "
        f"({r['input_tokens']:,} "
        f"tokens) of {r['data']}; seed {r['seed']}, mlm probability {r['mlm_probability']}"
        + (", whole words" if r["whole_word_mask"] else ""),
    ]
    if "reference" in r:
        ref = r["reference"]
        lines.append(
            f"  transformers: loss {ref['loss']:.4f}  perplexity {ref['perplexity']:.2f}  accuracy "
            f"{ref['accuracy']:.4f}  (loss differs by {abs(ref['loss'] - r['loss']):.1e})"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="note: %(message)s")
    if args.eval:
        eval_main(args)
    else:
        fill_mask_main(args)


if __name__ == "__main__":
    run_cli(main)
