"""Top-k fill-mask: the same answers, keys and order as `transformers.pipeline("fill-mask")`.

For one text with one mask the result is a list of candidates, each
    {"score": p, "token": id, "token_str": decoded token, "sequence": the text, the mask filled}
best first; a text with several masks gives one such list per mask. As in the pipeline, `sequence`
drops special tokens when the text has one mask and keeps them when it has several (the other masks
stay). Texts are batched and padded; the head runs on the masked rows only."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from mlm.errors import InputError
from mlm.model import MaskedLM
from mlm.tokenizer import MASK_ALIASES, Tokenizer

log = logging.getLogger("mlm")


def normalise_masks(text: str, tokenizer: Tokenizer) -> str:
    """Accept both `[MASK]` and `<mask>` and write the model's own mask token."""
    for alias in MASK_ALIASES:
        if alias != tokenizer.mask_token:
            text = text.replace(alias, tokenizer.mask_token)
    return text


def target_ids(tokenizer: Tokenizer, targets: str | Sequence[str]) -> list[int]:
    """Vocabulary ids for `targets`; a word not in the vocabulary stands for its first token, as in
    HF."""
    if isinstance(targets, str):
        targets = [targets]
    vocab = tokenizer.get_vocab()
    ids = []
    for target in targets:
        token_id = vocab.get(target)
        if token_id is None:
            pieces = tokenizer.encode(target, add_special_tokens=False)
            if not pieces:
                log.warning(
                    "target %r is not in the vocabulary and has no tokens; ignoring it", target
                )
                continue
            token_id = pieces[0]
            log.warning(
                "target %r is not in the vocabulary; using its first token %r",
                target,
                tokenizer.convert_ids_to_tokens([token_id])[0],
            )
        ids.append(token_id)
    ids = list(set(ids))
    if not ids:
        raise InputError(
            "none of the targets maps to a token; pass words from the model's vocabulary"
        )
    return ids


@torch.inference_mode()
def fill_mask(
    model: MaskedLM,
    tokenizer: Tokenizer,
    texts: str | Sequence[str],
    top_k: int = 5,
    targets: str | Sequence[str] | None = None,
    batch_size: int = 32,
) -> list:
    """Predict the masked words of each text. A list of texts gives a list with one result per text;
    a single string gives its result directly, as the pipeline does."""
    single_input = isinstance(texts, str)
    texts = [texts] if single_input else list(texts)
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    texts = [normalise_masks(t, tokenizer) for t in texts]
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
    allowed = torch.tensor(target_ids(tokenizer, targets)) if targets is not None else None
    k = min(top_k, len(allowed)) if allowed is not None else min(top_k, model.config.vocab_size)

    was_training = model.training
    if was_training:  # switching modes walks every module: only when needed
        model.eval()
    device = next(model.parameters()).device
    results = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size])
            ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, T)
            for row, text in enumerate(texts[start : start + batch_size]):
                if not (ids[row] == mask_id).any():
                    raise InputError(
                        f"text {start + row + 1} has no mask token: {text!r}; put [MASK] or <mask> "
                        "where the word goes"
                    )
            hidden = model.encode(ids.to(device), attention.to(device))  # (B, T, C)
            is_mask = ids == mask_id  # (B, T)
            probs = model.logits(hidden[is_mask.to(device)]).float().softmax(dim=-1).cpu()  # (N, V)
            if allowed is not None:
                probs = probs[:, allowed]
            scores, picks = probs.topk(k, dim=-1)  # (N, k)
            if allowed is not None:
                picks = allowed[picks]
            first = 0
            for row in range(ids.shape[0]):
                tokens = ids[row][attention[row].bool()]
                positions = (tokens == mask_id).nonzero().flatten().tolist()
                rows = range(first, first + len(positions))
                first += len(positions)
                per_mask = [
                    _candidates(
                        tokenizer,
                        tokens,
                        pos,
                        scores[r],
                        picks[r],
                        single=len(positions) == 1,
                        pad_id=pad_id,
                    )
                    for pos, r in zip(positions, rows)
                ]
                results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
    finally:
        if was_training:
            model.train()
    return results[0] if single_input else results


def _candidates(
    tokenizer, tokens, position, scores, picks, *, single: bool, pad_id: int
) -> list[dict]:
    out = []
    for score, token in zip(scores.tolist(), picks.tolist()):
        filled = tokens.clone()
        filled[position] = token
        filled = filled[filled != pad_id]  # the pipeline drops any pad ids before decoding
        out.append(
            {
                "score": score,
                "token": token,
                "token_str": tokenizer.decode([token]),
                "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=single),
            }
        )
    return out
