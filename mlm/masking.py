"""Masking for masked language modelling: which tokens the model must predict, and what it sees
there.

BERT's recipe, as Hugging Face's `DataCollatorForLanguageModeling` implements it, is `mask_tokens`
just below: choose each candidate token (not special, not padding) with probability
`mlm_probability` (0.15) and label it with its own id (every other label is -100, which the loss
skips); then of the chosen, `mask_replace_prob` (0.8) show [MASK], `random_replace_prob` (0.1) a
uniformly random id, the rest stay.

Its randomness comes from one of two sources with the same methods:
- `_RowSeededDraws`, a counter-based hash of (row seed, position): a row's mask never depends on its
  batch, its neighbours, the rank or the device. `row_seeds_for` makes the seeds from (seed, epoch,
  sample index); train.py masks with them, and `mask_eval_blocks` gives every validation block one
  fixed mask.
- `_GeneratorDraws`, a torch.Generator: fast, the gaps between chosen positions are drawn directly;
  for callers of `mask_tokens` who bring a generator (training does not).

Options, none of them a Python loop over rows: `word_starts` chooses whole words; `static=True`
chooses exactly round(mlm_probability * candidates) tokens per row (at most that many with whole
words), fixed shapes for torch.compile; `min_one=True` gives every row with a candidate a target, so
a short row never makes the mean loss 0/0.

Shapes: B rows, T tokens per row, n chosen tokens; a flat position is row * T + column.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Protocol

import torch

from mlm.errors import InputError

IGNORE_INDEX = -100  # what torch's cross_entropy skips by default, and what HF labels carry


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
    """Choose targets and corrupt them, BERT style; returns new (masked_input_ids, labels), both (B,
    T).

    special_ids (and mask_token_id itself) are never chosen, nor positions where attention_mask is
    0. Randomness comes from `row_seeds` (B,) if given (see module docstring), else from `generator`
    (on the input's device), else from torch's global RNG. word_starts (B, T) bool switches to whole
    words; static=True picks exactly round(mlm_probability * candidates) tokens per row (at most
    that many with whole words); min_one=True rescues rows that would have no target."""
    _check_args(
        input_ids,
        mask_token_id,
        vocab_size,
        mlm_probability,
        mask_replace_prob,
        random_replace_prob,
        generator,
        word_starts,
        row_seeds,
        attention_mask,
    )
    B, T = input_ids.shape
    flat_ids = input_ids.reshape(-1)  # (B*T,)
    draws = (
        _RowSeededDraws(row_seeds, B, T, input_ids.device)
        if row_seeds is not None
        else _GeneratorDraws(generator, B, T, input_ids.device)
    )
    is_candidate = _candidate_test(flat_ids, attention_mask, vocab_size, special_ids, mask_token_id)

    # Choose: the chosen tokens keep their ids as labels. Only they are touched from here on
    # (gathers and scatters at flat positions, no full-size `where`): ~15% of the batch.
    if word_starts is None and not static:
        chosen = _choose_tokens(draws, is_candidate, mlm_probability, min_one)  # (n,) flat
    else:
        candidate = is_candidate(torch.arange(B * T, device=input_ids.device)).view(B, T)
        words = _choose_words(
            input_ids,
            candidate,
            word_starts,
            mlm_probability,
            static,
            min_one,
            draws.choice_uniforms(),
        )  # (B, T) bool
        chosen = words.view(-1).nonzero().squeeze(1)  # (n,) flat
    labels = torch.full_like(flat_ids, IGNORE_INDEX).scatter_(
        0, chosen, flat_ids.index_select(0, chosen)
    )

    # Corrupt: one uniform per chosen token, cut into [0, mask) -> [MASK], [mask, mask + random) ->
    # a random id, the rest -> unchanged. HF draws two Bernoullis (the second rescaled to the
    # remainder): the same distribution. Per token even inside whole words, as in HF's whole-word
    # collator (transformers 5's whole_word_mask=True also forces mask_replace_prob=1; we keep the
    # caller's split). Random ids span the whole vocabulary, specials included, as HF's collator
    # does (it draws from len(tokenizer)).
    u = draws.action_uniforms(chosen)  # (n,)
    show_mask = u < mask_replace_prob
    show_random = ~show_mask & (u < mask_replace_prob + random_replace_prob)
    masked = flat_ids.clone().scatter_(0, chosen.masked_select(show_mask), mask_token_id)
    at = chosen.masked_select(show_random)  # random ids are drawn only where one is shown
    masked.scatter_(0, at, draws.random_ids(at, vocab_size))
    return masked.view(B, T), labels.view(B, T)


def _choose_tokens(
    draws: _Draws, is_candidate: Callable[[torch.Tensor], torch.Tensor], p: float, min_one: bool
) -> torch.Tensor:
    """HF's choice: each candidate independently with probability p. Returns flat positions (n,),
    sorted except for rescued ones, appended at the end."""
    chosen = draws.choose(p)
    chosen = chosen.masked_select(is_candidate(chosen))
    if not min_one:
        return chosen
    B, T, device = draws.B, draws.T, chosen.device
    # chosen is sorted, so row b's targets are its entries row_starts[b] .. row_starts[b + 1] - 1.
    row_starts = torch.searchsorted(chosen, torch.arange(B + 1, device=device) * T)  # (B + 1,)
    has_target = row_starts[1:] > row_starts[:-1]  # (B,)
    if has_target.all():  # the rescue is rare at realistic lengths
        return chosen
    # Each row with nothing chosen gets its lowest-scoring candidate: a uniformly random one.
    empty = (~has_target).nonzero().squeeze(1)  # (E,)
    flat = empty[:, None] * T + torch.arange(T, device=device)  # (E, T)
    score = torch.where(is_candidate(flat), draws.rescue_scores(empty), float("inf"))  # (E, T)
    pick = empty * T + score.argmin(dim=1)  # (E,)
    # rows without a candidate stay empty
    return torch.cat([chosen, pick[score.isfinite().any(dim=1)]])


def _choose_words(
    input_ids: torch.Tensor,
    candidate: torch.Tensor,
    word_starts: torch.Tensor | None,
    p: float,
    static: bool,
    min_one: bool,
    u_choose: torch.Tensor,
) -> torch.Tensor:
    """Whole words and static counts: the chosen tokens as a (B, T) bool mask. Each word is scored
    by its first token's uniform in u_choose (B, T); without word_starts every candidate is a word
    of its own."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    inf = float("inf")
    # A non-candidate is always a one-token word, and the token after it always starts a word.
    if word_starts is None:
        starts, first = candidate, pos
    else:
        prev_candidate = torch.nn.functional.pad(candidate[:, :-1], (1, 0), value=False)
        starts = word_starts.to(input_ids.device) | ~candidate | ~prev_candidate
        # (B, T): where each token's word starts
        first = torch.where(starts, pos, 0).cummax(dim=1).values

    # Word-level arrays live at each word's first position.
    score = torch.where(starts & candidate, u_choose, inf)  # (B, T)
    if static:
        n_candidates = candidate.sum(dim=1)
        # torch.round, like Python's round, rounds halves to even.
        k = (n_candidates.double() * p).round().long()
        if min_one:
            k = torch.maximum(k, (n_candidates > 0).long())
        # (B, T)
        length = torch.zeros_like(input_ids).scatter_add_(1, first, torch.ones_like(input_ids))
        # Whole words make exactly k impossible in general: take words in random order while the
        # running token count stays <= k (words longer than k alone are skipped, so a row whose
        # every word is longer than k gets no target even with min_one). Without word_starts every
        # length is 1, so this takes exactly the k lowest-scoring tokens.
        score = torch.where(length <= k[:, None], score, inf)
        order = score.argsort(dim=1, stable=True)  # ties between equal uniforms broken by position
        fits = (length.gather(1, order).cumsum(dim=1) <= k[:, None]) & score.gather(
            1, order
        ).isfinite()
        chosen_word = torch.zeros_like(candidate).scatter_(1, order, fits)
    else:
        chosen_word = score < p

    if min_one:
        # A row with nothing chosen gets its lowest-scoring word: uniformly random among its words.
        empty = ~chosen_word.any(dim=1) & score.isfinite().any(dim=1)  # (B,)
        chosen_word |= empty[:, None] & (pos == score.argmin(dim=1, keepdim=True))
    # (B, T): spread each word's choice to its tokens
    return chosen_word.gather(1, first) & candidate


# --- sources of randomness
# ---------------------------------------------------------------------------


class _Draws(Protocol):
    """Where mask_tokens' randomness comes from. Uniforms are on [0, 1); positions are flat."""

    B: int
    T: int

    def choose(self, p: float) -> torch.Tensor:
        """Sorted positions (n,), each one present independently with probability p, candidate or
        not."""

    def rescue_scores(self, rows: torch.Tensor) -> torch.Tensor:
        """(E, T) scores for the rows (E,) left without a target, such that each candidate of a row
        is equally likely to score lowest."""

    def choice_uniforms(self) -> torch.Tensor:
        """(B, T) uniforms, one per position: whole words and static counts rank by them."""

    def action_uniforms(self, chosen: torch.Tensor) -> torch.Tensor:
        """(n,) uniforms for the chosen positions (n,): what each one shows."""

    def random_ids(self, at: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(m,) ids uniform on [0, vocab_size) for the positions at (m,)."""


class _GeneratorDraws:
    """Draws from a torch.Generator, or from torch's global RNG when it is None. The fast source:
    `choose` draws the gaps between chosen positions, so the unchosen ~85% cost nothing. Each call
    consumes the generator in turn, so a row's draws depend on everything drawn before them.

    Training, validation and `prepare.py --preview` never take this path (they mask with row seeds);
    it is kept for a caller's own `mask_tokens(ids, ...)` with a generator or the global RNG, as
    HF's collator is called: the README's example and bench.py's like-for-like collator row."""

    def __init__(self, generator: torch.Generator | None, B: int, T: int, device: torch.device):
        self.generator, self.B, self.T, self.device = generator, B, T, device

    def choose(self, p: float) -> torch.Tensor:
        return _bernoulli_positions(self.B * self.T, p, self.generator, self.device)

    def rescue_scores(self, rows: torch.Tensor) -> torch.Tensor:
        return self._uniform((len(rows), self.T))

    def choice_uniforms(self) -> torch.Tensor:
        return self._uniform((self.B, self.T))

    def action_uniforms(self, chosen: torch.Tensor) -> torch.Tensor:
        return self._uniform(chosen.shape)

    def random_ids(self, at: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return torch.randint(vocab_size, at.shape, generator=self.generator, device=self.device)

    def _uniform(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)


# gaps drawn beyond the expected count, in standard deviations: a second round ~1e-9 of the time
_GAP_MARGIN = 6.0


def _bernoulli_positions(
    n: int, p: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """The successes among n independent Bernoulli(p) trials, as sorted indices in [0, n).

    The gaps between successes are Geometric(p): floor(log(v) / log(1 - p)) + 1 for v uniform on (0,
    1]. Drawing gaps costs about p * n uniforms instead of n, and nothing is computed at the other
    positions."""
    found, start = [], 0
    while True:
        mean = (n - start) * p
        draws = max(16, int(mean + _GAP_MARGIN * (mean * (1 - p)) ** 0.5) + 16)
        # log(v), v = 1 - u in (0, 1]
        log_v = torch.rand(draws, generator=generator, device=device).neg_().log1p_()
        gaps = log_v.mul_(1.0 / math.log1p(-p)).floor_().long().add_(1)
        positions = gaps.cumsum(0).add_(start - 1)  # sorted, so the ones below n are a prefix
        found.append(positions[: int(torch.searchsorted(positions, n))])
        start = int(positions[-1]) + 1
        if start >= n:
            return torch.cat(found) if len(found) > 1 else found[0]


class _RowSeededDraws:
    """Draws that are a pure function of (row seed, position), so the same for a row in any batch,
    on any rank or device. The price of that: one hash per position up front, where the generator
    skips the unchosen ones. That hash's top 24 bits make the choice uniform, the next 24 the action
    uniform; random ids come from a second hash, computed only where one is shown."""

    def __init__(self, row_seeds: torch.Tensor, B: int, T: int, device: torch.device):
        self.B, self.T = B, T
        # (B,); mixed so seeds 0, 1, 2... are unrelated
        self.keys = _mix(row_seeds.to(device).long())
        self.bits = _hash(self.keys[:, None], torch.arange(T, device=device), 1).view(-1)  # (B*T,)

    def choose(self, p: float) -> torch.Tensor:
        # u < p on the 24-bit integer: u = k / 2**24 < p exactly when k < ceil(p * 2**24)
        return (_shr(self.bits, 40) < math.ceil(p * 2**24)).nonzero().squeeze(1)

    def rescue_scores(self, rows: torch.Tensor) -> torch.Tensor:
        # The choice uniforms again: those of a row with nothing chosen are all >= p, and still
        # independent and identically distributed, so the lowest is a uniformly random candidate.
        return _u_choose(self.bits.view(self.B, self.T)[rows])

    def choice_uniforms(self) -> torch.Tensor:
        return _u_choose(self.bits).view(self.B, self.T)

    def action_uniforms(self, chosen: torch.Tensor) -> torch.Tensor:
        return _u_action(self.bits.index_select(0, chosen))

    def random_ids(self, at: torch.Tensor, vocab_size: int) -> torch.Tensor:
        bits = _hash(self.keys.index_select(0, at // self.T), at % self.T, 2)
        return (bits & (2**63 - 1)) % vocab_size  # bias vocab_size / 2**63: nil


# --- counter-based hashing (splitmix64)
# -------------------------------------------------------------- torch has no uint64 arithmetic on
# every device, so the hash runs on int64: additions and multiplications wrap modulo 2**64 exactly
# as unsigned ones would, but `>>` is arithmetic (it copies the sign bit), so every right shift is
# followed by a mask that clears the copied bits.

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
    """splitmix64's finaliser, in place: a bijection on 64 bits where every input bit flips about
    half the output. One scratch tensor: fresh memory costs page faults at batch sizes, more than
    the arithmetic."""
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
    """One int64 seed per row from (seed, epoch, global sample index); (N,) -> (N,) on indices'
    device.

    Mixing after each ingredient keeps nearby triples (seed, epoch, i) and (seed, epoch, i + 1)
    unrelated."""
    return _mix_(indices.long() + _stream_key(seed, epoch))


# Two splitmix64 outputs per (row, position): counter 2t + 1 gives both uniforms (the choice from
# its top 24 bits, what is shown from the next 24), counter 2t + 2 the random replacement id. Each
# is a pure function of (row key, position), computed densely for a whole batch or only at chosen
# positions, with the same values on CPU and CUDA: 24 bits make a float32 in [0, 1) exactly, so
# comparisons agree across devices.


def _hash(keys: torch.Tensor, cols: torch.Tensor, counter: int) -> torch.Tensor:
    """splitmix64 of (row key, position t) at counter 2t + counter; keys and cols broadcast
    together."""
    return _mix_(keys + (cols * 2 + counter) * _GOLDEN)


def _u_choose(bits: torch.Tensor) -> torch.Tensor:
    """The uniform that decides whether a token is chosen: the top 24 bits."""
    return _shr(bits, 40).float() * 2.0**-24


def _u_action(bits: torch.Tensor) -> torch.Tensor:
    """The uniform that decides what a chosen token shows: the next 24 bits."""
    return _shr(bits, 16).bitwise_and_(2**24 - 1).float() * 2.0**-24


# --- candidates and argument checks
# ------------------------------------------------------------------


def _candidate_test(
    flat_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    vocab_size: int,
    special_ids: Iterable[int],
    mask_token_id: int,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from flat positions (any shape) to whether those tokens may be chosen (same
    shape): not special, not [MASK], not hidden by attention_mask."""
    never = frozenset(int(i) for i in special_ids) | {mask_token_id}
    ordinary = _ordinary_ids(vocab_size, never, flat_ids.device)  # (V,) bool
    flat_attention = (
        None if attention_mask is None else attention_mask.reshape(-1).to(flat_ids.device)
    )  # (B*T,)

    # index_select rather than indexing syntax: the same, and about twice as fast on the CPU, which
    # matters at ~5k positions per batch.
    def is_candidate(flat: torch.Tensor) -> torch.Tensor:
        ok = ordinary.index_select(0, flat_ids.index_select(0, flat.reshape(-1))).view(flat.shape)
        return ok if flat_attention is None else ok & flat_attention[flat].bool()

    return is_candidate


@functools.lru_cache(maxsize=16)
def _ordinary_ids(vocab_size: int, never: frozenset[int], device: torch.device) -> torch.Tensor:
    """A lookup table over the vocabulary, True for the ids that may be chosen: one gather per
    token, cheaper than isin. Cached, so a training loop builds it once; nothing writes to it."""
    table = torch.ones(max(vocab_size, max(never) + 1), dtype=torch.bool, device=device)
    table[sorted(never)] = False
    return table


def _check_args(
    input_ids,
    mask_token_id,
    vocab_size,
    mlm_probability,
    mask_replace_prob,
    random_replace_prob,
    generator,
    word_starts,
    row_seeds,
    attention_mask,
) -> None:
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype != torch.long
    ):
        raise InputError(
            "input_ids must be a 2-D torch.long tensor (B, T); convert with .long() or reshape"
        )
    if input_ids.shape[1] == 0:
        raise InputError("input_ids has no tokens (T == 0); pass blocks of at least one token")
    if not 0 <= mask_token_id < vocab_size:
        raise InputError(
            f"mask_token_id {mask_token_id} is outside [0, {vocab_size}); check vocab_size"
        )
    if not 0 < mlm_probability < 1:
        raise InputError(f"mlm_probability must be strictly between 0 and 1, got {mlm_probability}")
    for name, p in (
        ("mask_replace_prob", mask_replace_prob),
        ("random_replace_prob", random_replace_prob),
    ):
        if not 0 <= p <= 1:
            raise InputError(f"{name} must be in [0, 1], got {p}")
    if mask_replace_prob + random_replace_prob > 1 + 1e-9:  # slack for sums like 0.7 + 0.3
        raise InputError(
            f"mask_replace_prob + random_replace_prob = {mask_replace_prob + random_replace_prob} "
            "exceeds 1; "
            "they are fractions of the chosen tokens, so lower one of them"
        )
    for name, t in (("word_starts", word_starts), ("attention_mask", attention_mask)):
        if t is not None and t.shape != input_ids.shape:
            raise InputError(
                f"{name} is {tuple(t.shape)} but input_ids {tuple(input_ids.shape)}; match them"
            )
    if word_starts is not None and word_starts.dtype != torch.bool:
        raise InputError("word_starts must be a bool tensor (True at each word's first token)")
    if row_seeds is not None:
        if generator is not None:
            raise InputError(
                "pass either generator or row_seeds, not both: row_seeds fix all the randomness"
            )
        if row_seeds.shape != input_ids.shape[:1] or row_seeds.dtype != torch.long:
            raise InputError(
                f"row_seeds must be int64 of shape ({input_ids.shape[0]},): one seed per row"
            )
    if generator is not None and generator.device.type != input_ids.device.type:
        raise InputError(
            f"generator is on {generator.device}, input_ids on {input_ids.device}; move one"
        )


def mask_eval_blocks(
    blocks: torch.Tensor, *, seed: int, block_indices: torch.Tensor | None = None, **mask_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed masks for validation blocks (N, T): block i's mask depends only on (seed, i).

    block_indices are the blocks' global indices (default 0..N-1), so a rank that evaluates blocks
    10..19 passes arange(10, 20) and gets exactly the masks a single process would. Epoch -1 keeps
    these seeds apart from every training epoch's.
    """
    if "generator" in mask_kwargs or "row_seeds" in mask_kwargs:
        raise InputError(
            "mask_eval_blocks derives row_seeds from seed; do not pass generator or row_seeds"
        )
    if block_indices is None:
        block_indices = torch.arange(blocks.shape[0], device=blocks.device)
    if block_indices.shape != blocks.shape[:1]:
        raise InputError(
            f"block_indices must have shape ({blocks.shape[0]},), one global index per block"
        )
    return mask_tokens(
        blocks, row_seeds=row_seeds_for(seed, block_indices, epoch=-1), **mask_kwargs
    )


def preview(
    tokenizer_decode: Callable[[list[int]], str],
    masked_input_ids: torch.Tensor,
    labels: torch.Tensor,
    mask_token: str = "[MASK]",
    n: int = 3,
) -> str:
    """A few masked rows for people: the text the model sees, then what it must predict.

    tokenizer_decode must keep special tokens, so [MASK] shows. Each target is tagged with what the
    model saw there: nothing for [MASK], `(saw 'x')` for a random replacement, `(kept)` when
    unchanged."""
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
