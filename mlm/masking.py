"""Masking for masked language modelling: which tokens the model must predict, and what it sees there.

The recipe is BERT's, as Hugging Face's `DataCollatorForLanguageModeling` implements it:

1. Choose each candidate token (not special, not padding) with probability `mlm_probability` (0.15).
   Its original id becomes the label; every other label is -100, which the loss ignores.
2. At each chosen token, `mask_replace_prob` (0.8) of the time show [MASK], `random_replace_prob` (0.1)
   of the time show a uniformly random token id, and the rest of the time (0.1) leave it as it was.
   Both numbers are fractions of the *chosen* tokens, so they must sum to at most 1. HF draws this with
   two Bernoullis (the second rescaled to the remainder); one uniform cut into three intervals is the
   same distribution.

With `word_starts`, whole words are chosen instead of tokens: a word is chosen with probability
`mlm_probability` and all its pieces are labelled. The 80/10/10 decision stays per token, as in HF's
whole-word collator (`DataCollatorForWholeWordMask` in transformers 4; transformers 5 folded it into
`DataCollatorForLanguageModeling(whole_word_mask=True)`, which decides per token too but forces
`mask_replace_prob=1`; we keep whatever split the caller asks for).

What we add, all as pure tensor functions (no Python loop over rows or tokens):

- `row_seeds`: row i's randomness is a counter-based hash of (row_seeds[i], position), so a row's
  mask does not depend on its batch, its neighbours, the rank it lands on, or the device.
  `row_seeds_for` builds these seeds from (seed, epoch, global sample index); `mask_eval_blocks` uses it
  to give every validation block one fixed mask, so perplexity compares across runs and world sizes.
- `static=True`: exactly round(mlm_probability * candidates) chosen tokens per row (at most that many
  with whole words), so a head that only scores chosen positions sees fixed shapes under torch.compile
  when every block holds the same number of real tokens.
- `min_one=True`: every row with a candidate gets at least one target, so a short row never makes
  the mean loss 0/0 = NaN.

Speed: after the choice, only the chosen ~15% of positions are touched (gathers and scatters on flat
indices, no full-size `where`). With a generator, even the choice skips the other 85%: the gaps
between chosen positions are drawn directly (`_bernoulli_positions`). Row seeds need one hash per
position, the price of layout independence.

Shapes: B rows, T tokens per row.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch

from mlm.errors import InputError

IGNORE_INDEX = -100  # what torch's cross_entropy skips by default, and what HF labels carry

# --- counter-based hashing (splitmix64) --------------------------------------------------------------
# torch has no uint64 arithmetic on every device, so the hash runs on int64: additions and
# multiplications wrap modulo 2**64 exactly as unsigned ones would, but `>>` is arithmetic (it copies
# the sign bit), so every right shift is followed by a mask that clears the copied bits.

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A Python int taken modulo 2**64, as the int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2**64 / golden ratio, odd
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logical right shift of int64 bits, into `out` if given."""
    return torch.bitwise_right_shift(z, s, out=out).bitwise_and_((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place: a bijection on 64 bits where every input bit flips about half the
    output. One scratch tensor: fresh memory costs page faults at batch sizes, more than the arithmetic."""
    scratch = _shr(z, 30)
    z ^= scratch
    z *= _MUL1
    z ^= _shr(z, 27, out=scratch)
    z *= _MUL2
    z ^= _shr(z, 31, out=scratch)
    return z


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on a copy of z."""
    return _mix_(z.clone())


@functools.lru_cache(maxsize=64)
def _stream_key(seed: int, epoch: int) -> int:
    """The hash state after mixing in (seed, epoch): computed once per pair, not once per batch."""
    base = _mix(torch.tensor(_i64(seed), dtype=torch.long) + _GOLDEN)
    return int(_mix(base + _i64(epoch)))


def row_seeds_for(seed: int, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
    """One int64 seed per row from (seed, epoch, global sample index); (N,) -> (N,) on indices' device.

    Mixing after each ingredient keeps nearby triples (seed, epoch, i) and (seed, epoch, i + 1) unrelated.
    """
    return _mix_(indices.long() + _stream_key(seed, epoch))


# Two splitmix64 outputs per (row, position): counter 2t + 1 gives both uniforms (the choice from its
# top 24 bits, what is shown from the next 24), counter 2t + 2 the random replacement id. Each is a
# pure function of (row key, position), computed densely for a whole batch or only at chosen positions,
# with the same values on CPU and CUDA: 24 bits make a float32 in [0, 1) exactly, so comparisons agree
# across devices.


def _hash(keys: torch.Tensor, cols: torch.Tensor, counter: int) -> torch.Tensor:
    """splitmix64 of (row key, position t) at counter 2t + counter; keys and cols broadcast together."""
    return _mix_(keys + (cols * 2 + counter) * _GOLDEN)


def _u_choose(bits: torch.Tensor) -> torch.Tensor:
    """The uniform that decides whether a token is chosen: the top 24 bits."""
    return _shr(bits, 40).float() * 2.0**-24


def _u_action(bits: torch.Tensor) -> torch.Tensor:
    """The uniform that decides what a chosen token shows: the next 24 bits."""
    return _shr(bits, 16).bitwise_and_(2**24 - 1).float() * 2.0**-24


_GAP_MARGIN = 6.0  # gaps drawn beyond the expected count, in standard deviations: a second round ~1e-9 of the time


def _bernoulli_positions(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The successes among n independent Bernoulli(p) trials, as sorted indices in [0, n).

    The gaps between successes are Geometric(p): floor(log(v) / log(1 - p)) + 1 for v uniform on (0, 1].
    Drawing gaps costs about p * n uniforms instead of n, and nothing is computed at the other positions.
    """
    found, start = [], 0
    while True:
        mean = (n - start) * p
        draws = max(16, int(mean + _GAP_MARGIN * (mean * (1 - p)) ** 0.5) + 16)
        log_v = torch.rand(draws, generator=generator, device=device).neg_().log1p_()  # log(v), v = 1 - u in (0, 1]
        gaps = log_v.mul_(1.0 / math.log1p(-p)).floor_().long().add_(1)
        positions = gaps.cumsum(0).add_(start - 1)  # sorted, so the ones below n are a prefix
        found.append(positions[: int(torch.searchsorted(positions, n))])
        start = int(positions[-1]) + 1
        if start >= n:
            return torch.cat(found) if len(found) > 1 else found[0]


@functools.lru_cache(maxsize=16)
def _ordinary_ids(vocab_size: int, never: frozenset[int], device: torch.device) -> torch.Tensor:
    """A lookup table over the vocabulary, True for the ids that may be chosen: one gather per token, cheaper
    than isin. Cached, so a training loop builds it once; nothing writes to it."""
    table = torch.ones(max(vocab_size, max(never) + 1), dtype=torch.bool, device=device)
    table[sorted(never)] = False
    return table


def _check_args(input_ids, mask_token_id, vocab_size, mlm_probability, mask_replace_prob,
                random_replace_prob, generator, word_starts, row_seeds, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InputError("input_ids must be a 2-D torch.long tensor (B, T); convert with .long() or reshape")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids has no tokens (T == 0); pass blocks of at least one token")
    if not 0 <= mask_token_id < vocab_size:
        raise InputError(f"mask_token_id {mask_token_id} is outside [0, {vocab_size}); check vocab_size")
    if not 0 < mlm_probability < 1:
        raise InputError(f"mlm_probability must be strictly between 0 and 1, got {mlm_probability}")
    for name, p in (("mask_replace_prob", mask_replace_prob), ("random_replace_prob", random_replace_prob)):
        if not 0 <= p <= 1:
            raise InputError(f"{name} must be in [0, 1], got {p}")
    if mask_replace_prob + random_replace_prob > 1 + 1e-9:  # slack for sums like 0.7 + 0.3
        raise InputError(
            f"mask_replace_prob + random_replace_prob = {mask_replace_prob + random_replace_prob} exceeds 1; "
            "they are fractions of the chosen tokens, so lower one of them")
    for name, t in (("word_starts", word_starts), ("attention_mask", attention_mask)):
        if t is not None and t.shape != input_ids.shape:
            raise InputError(f"{name} is {tuple(t.shape)} but input_ids {tuple(input_ids.shape)}; match them")
    if word_starts is not None and word_starts.dtype != torch.bool:
        raise InputError("word_starts must be a bool tensor (True at each word's first token)")
    if row_seeds is not None:
        if generator is not None:
            raise InputError("pass either generator or row_seeds, not both: row_seeds fix all the randomness")
        if row_seeds.shape != input_ids.shape[:1] or row_seeds.dtype != torch.long:
            raise InputError(f"row_seeds must be int64 of shape ({input_ids.shape[0]},): one seed per row")
    if generator is not None and generator.device.type != input_ids.device.type:
        raise InputError(f"generator is on {generator.device}, input_ids on {input_ids.device}; move one")


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
    word_starts: torch.Tensor | None = None,
    row_seeds: torch.Tensor | None = None,
    static: bool = False,
    min_one: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose targets and corrupt them, BERT style; returns new (masked_input_ids, labels), both (B, T).

    special_ids (and mask_token_id itself) are never chosen, nor positions where attention_mask is 0.
    Randomness comes from `row_seeds` (B,) if given (see module docstring), else from `generator` (on the
    input's device), else from torch's global RNG. word_starts (B, T) bool switches to whole words;
    static=True picks exactly round(mlm_probability * candidates) tokens per row (at most that many
    with whole words); min_one=True rescues rows that would have no target.
    """
    _check_args(input_ids, mask_token_id, vocab_size, mlm_probability, mask_replace_prob,
                random_replace_prob, generator, word_starts, row_seeds, attention_mask)
    B, T = input_ids.shape
    device = input_ids.device
    flat_ids = input_ids.reshape(-1)  # (B*T,); positions below are flat indices row * T + column
    flat_attention = None if attention_mask is None else attention_mask.reshape(-1).to(device)
    ordinary = _ordinary_ids(vocab_size, frozenset(int(i) for i in special_ids) | {mask_token_id}, device)

    # index_select, masked_select and scatter_ below rather than indexing syntax: they do the same
    # and are about twice as fast on the CPU, which matters at ~5k positions per batch.
    def is_candidate(flat: torch.Tensor) -> torch.Tensor:
        """Whether the tokens at these flat positions may be chosen: not special, not hidden by attention_mask."""
        ok = ordinary.index_select(0, flat_ids.index_select(0, flat.reshape(-1))).view(flat.shape)
        return ok if flat_attention is None else ok & flat_attention[flat].bool()

    columns = torch.arange(T, device=device)
    keys = bits = None
    if row_seeds is not None:
        keys = _mix(row_seeds.to(device).long())  # (B,); mixed so seeds 0, 1, 2... are unrelated
        bits = _hash(keys[:, None], columns, 1).view(-1)  # (B*T,): both uniforms of every position

    if word_starts is None and not static:
        # The common case, HF's collator: each candidate independently with probability p. Only the
        # chosen ~15% of positions are visited after this.
        if keys is None:
            chosen = _bernoulli_positions(B * T, mlm_probability, generator, device)  # (n,) flat, sorted
        else:  # u < p on the 24-bit integer: u = k / 2**24 < p exactly when k < ceil(p * 2**24)
            chosen = (_shr(bits, 40) < math.ceil(mlm_probability * 2**24)).nonzero().squeeze(1)
        chosen = chosen.masked_select(is_candidate(chosen))
        if min_one:
            # chosen is sorted, so row b's targets are its entries row_starts[b] .. row_starts[b + 1] - 1.
            row_starts = torch.searchsorted(chosen, torch.arange(B + 1, device=device) * T)  # (B + 1,)
            has_target = row_starts[1:] > row_starts[:-1]  # (B,)
            if not has_target.all():  # rare at realistic lengths: the rescue is a uniformly random candidate
                empty = (~has_target).nonzero().squeeze(1)  # (E,) rows with nothing chosen
                flat = empty[:, None] * T + columns  # (E, T)
                if keys is None:
                    score = torch.rand(flat.shape, generator=generator, device=device)
                else:  # the lowest u_choose among the row's candidates, all of them >= p
                    score = _u_choose(bits.view(B, T)[empty])
                score = torch.where(is_candidate(flat), score, float("inf"))
                pick = score.argmin(dim=1)
                chosen = torch.cat([chosen, (empty * T + pick)[score.isfinite().any(dim=1)]])
    else:
        if keys is None:
            u_choose = torch.rand(B, T, generator=generator, device=device)
        else:
            u_choose = _u_choose(bits).view(B, T)
        candidate = is_candidate(torch.arange(B * T, device=device)).view(B, T)
        chosen_mask = _choose_words(input_ids, candidate, word_starts, mlm_probability, static, min_one, u_choose)
        chosen = chosen_mask.view(-1).nonzero().squeeze(1)

    # One uniform per chosen token, cut into [0, mask) -> [MASK], [mask, mask + random) -> random id,
    # the rest -> unchanged. Per token even for whole words, as in HF. Random ids span the whole
    # vocabulary, specials included, as HF's collator does (it draws from len(tokenizer)).
    if keys is None:
        u_action = torch.rand(chosen.shape, generator=generator, device=device)
    else:
        u_action = _u_action(bits.index_select(0, chosen))
    show_mask = u_action < mask_replace_prob
    show_random = ~show_mask & (u_action < mask_replace_prob + random_replace_prob)
    labels = torch.full((B * T,), IGNORE_INDEX, dtype=input_ids.dtype, device=device)
    labels.scatter_(0, chosen, flat_ids.index_select(0, chosen))
    masked = flat_ids.clone().scatter_(0, chosen.masked_select(show_mask), mask_token_id)
    at = chosen.masked_select(show_random)  # random ids are drawn only where one is shown
    if keys is None:
        random_ids = torch.randint(vocab_size, at.shape, generator=generator, device=device)
    else:
        random_bits = _hash(keys.index_select(0, at // T), at % T, 2)
        random_ids = (random_bits & (2**63 - 1)) % vocab_size  # bias vocab_size / 2**63: nil
    masked.scatter_(0, at, random_ids)
    return masked.view(B, T), labels.view(B, T)


def _choose_words(
    input_ids: torch.Tensor, candidate: torch.Tensor, word_starts: torch.Tensor | None, p: float,
    static: bool, min_one: bool, u_choose: torch.Tensor,
) -> torch.Tensor:
    """Whole words and static counts: the chosen tokens as a (B, T) bool mask. Each word is scored by its
    first token's uniform in u_choose (B, T); without word_starts every candidate is a word of its own."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    inf = float("inf")
    # A non-candidate is always a one-token word, and the token after it always starts a word.
    if word_starts is None:
        starts, first = candidate, pos
    else:
        prev_candidate = torch.nn.functional.pad(candidate[:, :-1], (1, 0), value=False)
        starts = word_starts.to(input_ids.device) | ~candidate | ~prev_candidate
        first = torch.where(starts, pos, 0).cummax(dim=1).values  # (B, T): where each token's word starts

    # Word-level arrays live at each word's first position.
    score = torch.where(starts & candidate, u_choose, inf)  # (B, T)
    if static:
        n_candidates = candidate.sum(dim=1)
        # torch.round, like Python's round, rounds halves to even.
        k = (n_candidates.double() * p).round().long()
        if min_one:
            k = torch.maximum(k, (n_candidates > 0).long())
        length = torch.zeros_like(input_ids).scatter_add_(1, first, torch.ones_like(input_ids))  # (B, T)
        # Whole words make exactly k impossible in general: take words in random order while the running
        # token count stays <= k (words longer than k alone are skipped, so a row whose every word is
        # longer than k gets no target even with min_one). Without word_starts every length is 1, so
        # this takes exactly the k lowest-scoring tokens.
        score = torch.where(length <= k[:, None], score, inf)
        order = score.argsort(dim=1, stable=True)  # ties between equal uniforms broken by position
        fits = (length.gather(1, order).cumsum(dim=1) <= k[:, None]) & score.gather(1, order).isfinite()
        chosen_word = torch.zeros_like(candidate).scatter_(1, order, fits)
    else:
        chosen_word = score < p

    if min_one:
        # A row with nothing chosen gets its lowest-scoring word: uniformly random among its words.
        empty = ~chosen_word.any(dim=1) & score.isfinite().any(dim=1)  # (B,)
        chosen_word |= empty[:, None] & (pos == score.argmin(dim=1, keepdim=True))
    return chosen_word.gather(1, first) & candidate  # (B, T): spread each word's choice to its tokens


def mask_eval_blocks(
    blocks: torch.Tensor, *, seed: int, block_indices: torch.Tensor | None = None, **mask_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed masks for validation blocks (N, T): block i's mask depends only on (seed, i).

    block_indices are the blocks' global indices (default 0..N-1), so a rank that evaluates blocks
    10..19 passes arange(10, 20) and gets exactly the masks a single process would. Epoch -1 keeps
    these seeds apart from every training epoch's.
    """
    if "generator" in mask_kwargs or "row_seeds" in mask_kwargs:
        raise InputError("mask_eval_blocks derives row_seeds from seed; do not pass generator or row_seeds")
    if block_indices is None:
        block_indices = torch.arange(blocks.shape[0], device=blocks.device)
    if block_indices.shape != blocks.shape[:1]:
        raise InputError(f"block_indices must have shape ({blocks.shape[0]},), one global index per block")
    return mask_tokens(blocks, row_seeds=row_seeds_for(seed, block_indices, epoch=-1), **mask_kwargs)


def preview(
    tokenizer_decode: Callable[[list[int]], str],
    masked_input_ids: torch.Tensor,
    labels: torch.Tensor,
    mask_token: str = "[MASK]",
    n: int = 3,
) -> str:
    """A few masked rows for people: the text the model sees, then what it must predict.

    tokenizer_decode must keep special tokens, so [MASK] shows. Each target is tagged with what the
    model saw there: nothing for [MASK], `(saw 'x')` for a random replacement, `(kept)` when unchanged.
    """
    lines = []
    for ids, row_labels in zip(masked_input_ids[:n].tolist(), labels[:n].tolist()):
        targets = []
        for shown, target in zip(ids, row_labels):
            if target == IGNORE_INDEX:
                continue
            word, seen = tokenizer_decode([target]), tokenizer_decode([shown])
            if seen != mask_token:
                word += " (kept)" if shown == target else f" (saw {seen!r})"
            targets.append(word)
        lines += [">>> " + tokenizer_decode(ids), "    targets: " + " | ".join(targets)]
    return "\n".join(lines)
