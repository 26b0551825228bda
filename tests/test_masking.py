"""mlm/masking.py: BERT's 80/10/10 recipe measured on ~700k tokens, exact invariants, and parity of
the statistics with transformers' DataCollatorForLanguageModeling.

Statistical tolerances: a masking rate over ~714k candidates has a standard deviation of about
0.0004, and an 80/10/10 split over ~107k chosen tokens about 0.0013, so ±0.5% and ±1% (absolute) sit
many standard deviations out: these tests fail on bugs, not on bad luck."""

import pytest
import torch

from mlm import masking
from mlm.errors import InputError
from mlm.masking import IGNORE_INDEX, _mix, mask_eval_blocks, mask_tokens, preview, row_seeds_for

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
V = 1000
KW = dict(mask_token_id=MASK, vocab_size=V, special_ids=SPECIAL)
RATE_TOL, SPLIT_TOL = 0.005, 0.01


def make_blocks(B: int, T: int, seed: int = 0, max_pad: int = 0) -> torch.Tensor:
    """[CLS] ordinary ids [SEP], then 0..max_pad [PAD]s: (B, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    lengths = T - torch.randint(0, max_pad + 1, (B,), generator=g)
    ids[torch.arange(T) >= lengths[:, None]] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    return ids


def make_word_starts(ids: torch.Tensor, seed: int = 1000) -> torch.Tensor:
    """Random words of mean length 2 (a word continues with probability 1/2), as WordPiece's '##'
    gives.

    Its seed differs from the masking seeds: the same stream would make word starts and choices
    correlated."""
    return torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.5


def randomness(kind: str, B: int, seed: int = 0) -> dict:
    if kind == "generator":
        return {"generator": torch.Generator().manual_seed(seed)}
    return {"row_seeds": row_seeds_for(seed, torch.arange(B))}


def candidates(ids: torch.Tensor) -> torch.Tensor:
    return ~torch.isin(ids, torch.tensor(SPECIAL))


def stats(ids, masked, labels) -> tuple[float, float, float, float]:
    """Masking rate over candidates, then the fractions of chosen tokens shown as [MASK], random,
    unchanged.

    A random draw that hits the original id counts as unchanged (1/V of them): invisible, and the
    same for both implementations."""
    chosen = labels != IGNORE_INDEX
    shown, orig = masked[chosen], ids[chosen]
    n = chosen.sum().item()
    as_mask = (shown == MASK).float().mean().item()
    kept = (shown == orig).float().mean().item()
    return n / candidates(ids).sum().item(), as_mask, 1 - as_mask - kept, kept


@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    return make_blocks(1400, 512, max_pad=40)  # ~700k candidate tokens, ~107k chosen at 15%


@pytest.mark.parametrize("kind", ["generator", "row_seeds"])
@pytest.mark.parametrize("mask_p, random_p", [(0.8, 0.1), (0.5, 0.3), (1.0, 0.0)])
def test_rate_and_split(big, kind, mask_p, random_p):
    masked, labels = mask_tokens(
        big,
        **KW,
        mask_replace_prob=mask_p,
        random_replace_prob=random_p,
        **randomness(kind, len(big)),
    )
    rate, as_mask, as_random, kept = stats(big, masked, labels)
    assert (labels != IGNORE_INDEX).sum() > 100_000
    assert rate == pytest.approx(0.15, abs=RATE_TOL)
    assert as_mask == pytest.approx(mask_p, abs=SPLIT_TOL)
    assert as_random == pytest.approx(random_p, abs=SPLIT_TOL)
    assert kept == pytest.approx(1 - mask_p - random_p, abs=SPLIT_TOL)


@pytest.mark.parametrize("kind", ["generator", "row_seeds"])
def test_choices_are_independent_bernoullis(kind):
    """Per row, the count of chosen tokens is Binomial(candidates, 0.15): right mean and right
    variance (a sampler that correlated positions, or lost some at row ends, would move the
    variance); and every column is chosen at the same rate, the first and last ones included."""
    # no specials: 128 candidates
    ids = torch.randint(5, V, (4000, 128), generator=torch.Generator().manual_seed(3))
    chosen = mask_tokens(ids, **KW, **randomness(kind, 4000), min_one=False)[1] != IGNORE_INDEX
    per_row = chosen.sum(dim=1).double()
    mean, var = 128 * 0.15, 128 * 0.15 * 0.85  # 19.2 and 16.3
    assert per_row.mean().item() == pytest.approx(mean, abs=0.1)  # sd of the mean 0.064
    assert per_row.var().item() == pytest.approx(var, rel=0.1)  # sd of the variance ~2.3%
    per_column = chosen.double().mean(dim=0)  # sd 0.0056 per column
    assert (per_column - 0.15).abs().max().item() < 0.03
    for edge in (per_column[:8], per_column[-8:]):
        assert edge.mean().item() == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize(
    "n, p", [(1, 0.5), (37, 0.15), (5000, 0.15), (100_000, 0.01), (2000, 0.99)]
)
def test_bernoulli_positions_even_when_the_first_draw_runs_short(monkeypatch, n, p):
    """The gap sampler behind the generator path, forced to draw too few gaps so that it loops."""
    monkeypatch.setattr(masking, "_GAP_MARGIN", -10.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    reps = min(2000, max(20, 200_000 // n))
    for _ in range(reps):
        positions = masking._bernoulli_positions(n, p, g, torch.device("cpu"))
        assert positions.dtype == torch.long
        # sorted, distinct
        assert ((positions >= 0) & (positions < n)).all() and (positions.diff() > 0).all()
        counts[positions] += 1
    assert counts.sum().item() / (n * reps) == pytest.approx(
        p, abs=4 * (p * (1 - p) / (n * reps)) ** 0.5 + 1e-9
    )


@pytest.mark.parametrize("kind", ["generator", "row_seeds"])
def test_random_replacements_uniform_over_whole_vocab(big, kind):
    masked, labels = mask_tokens(
        big, **KW, mask_replace_prob=0.0, random_replace_prob=1.0, **randomness(kind, len(big))
    )
    # specials included
    counts = torch.bincount(masked[labels != IGNORE_INDEX], minlength=V).double()
    expected = counts.sum() / V  # ~107 per id
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = V - 1
    # chi-square ~ normal(dof, sqrt(2 dof)) at this size; 6 standard deviations (p ~ 1e-9).
    assert chi2 < dof + 6 * (2 * dof) ** 0.5


WORD_AND_STATIC = [
    {},
    {"static": True},
    {"word_starts": True},
    {"word_starts": True, "static": True},
]


@pytest.mark.parametrize("kind", ["generator", "row_seeds"])
@pytest.mark.parametrize("options", WORD_AND_STATIC)
def test_invariants(options, kind):
    ids = make_blocks(64, 96, seed=1, max_pad=50)
    attention_mask = (ids != PAD).long()
    attention_mask[:, 1:6] = 0  # positions a caller hides; they must never be chosen either
    before = ids.clone()
    if options.get("word_starts"):
        options = {**options, "word_starts": make_word_starts(ids)}
    for seed in range(20):
        masked, labels = mask_tokens(
            ids, **KW, **options, attention_mask=attention_mask, **randomness(kind, 64, seed=seed)
        )
        chosen = labels != IGNORE_INDEX
        assert torch.equal(ids, before)  # the input is never modified
        assert not chosen[~candidates(ids) | (attention_mask == 0)].any()
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(masked[~chosen], ids[~chosen])
        assert ((masked >= 0) & (masked < V)).all()


@pytest.mark.parametrize("kind", ["generator", "row_seeds"])
def test_whole_words_are_masked_together(big, kind):
    word_starts = make_word_starts(big)
    masked, labels = mask_tokens(big, **KW, word_starts=word_starts, **randomness(kind, len(big)))
    chosen, cand = labels != IGNORE_INDEX, candidates(big)
    # Inside a word (a continuation piece after a candidate), a token shares its predecessor's fate.
    inside = ~word_starts[:, 1:] & cand[:, 1:] & cand[:, :-1]
    assert torch.equal(chosen[:, 1:][inside], chosen[:, :-1][inside])
    # The first candidate piece of each word (including one after [CLS]) decides: ~15% of words.
    first_piece = cand & (word_starts | ~torch.nn.functional.pad(cand[:, :-1], (1, 0), value=False))
    assert chosen[first_piece].float().mean().item() == pytest.approx(0.15, abs=RATE_TOL)
    # a '##' piece right after [CLS] is a word of its own
    assert chosen[:, 1][~word_starts[:, 1]].any()
    _, as_mask, as_random, kept = stats(big, masked, labels)
    assert (as_mask, as_random, kept) == pytest.approx((0.8, 0.1, 0.1), abs=SPLIT_TOL)
    # 80/10/10 is decided per token, as in HF: some chosen two-piece words show [MASK] next to a
    # non-[MASK].
    pair = inside & chosen[:, 1:]
    assert ((masked[:, 1:] == MASK) != (masked[:, :-1] == MASK))[pair].any()


@pytest.mark.parametrize("kind", ["generator", "row_seeds"])
def test_same_seed_same_masks_different_seed_different_masks(kind):
    ids = make_blocks(32, 128)
    a = mask_tokens(ids, **KW, **randomness(kind, 32, seed=7))
    b = mask_tokens(ids, **KW, **randomness(kind, 32, seed=7))
    c = mask_tokens(ids, **KW, **randomness(kind, 32, seed=8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("options", [{}, {"word_starts": True, "static": True}])
def test_row_seeds_make_masks_independent_of_batch_layout(options):
    ids = make_blocks(24, 80, seed=2, max_pad=30)
    if options.get("word_starts"):
        options = {**options, "word_starts": make_word_starts(ids)}
    seeds = row_seeds_for(3, torch.arange(24), epoch=5)

    def run(rows):  # mask only the given rows, batched together in that order
        kw = {**options, "word_starts": options["word_starts"][rows]} if options else {}
        return mask_tokens(ids[rows], **KW, **kw, row_seeds=seeds[rows])

    whole = run(torch.arange(24))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    shuffled = run(perm)
    assert torch.equal(shuffled[0], whole[0][perm]) and torch.equal(shuffled[1], whole[1][perm])
    halves = [run(torch.arange(0, 10)), run(torch.arange(10, 24))]
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    for i in range(24):
        alone = run(torch.tensor([i]))
        assert torch.equal(alone[0][0], whole[0][i]) and torch.equal(alone[1][0], whole[1][i])
    # Dynamic padding: trimming a row's padding leaves its mask unchanged.
    n = int((ids[0] != PAD).sum())
    kw = {**options, "word_starts": options["word_starts"][:1, :n]} if options else {}
    trimmed = mask_tokens(ids[:1, :n], **KW, **kw, row_seeds=seeds[:1])
    assert torch.equal(trimmed[1][0], whole[1][0, :n])


def test_row_seeds_for_mixes_seed_epoch_and_index():
    idx = torch.arange(1000)
    seeds = row_seeds_for(0, idx)
    assert seeds.dtype == torch.long and seeds.unique().numel() == 1000
    assert not torch.equal(seeds, row_seeds_for(1, idx))
    assert not torch.equal(seeds, row_seeds_for(0, idx, epoch=1))
    assert torch.equal(seeds[10:20], row_seeds_for(0, idx[10:20]))


def test_splitmix64_matches_unsigned_reference():
    # The int64 version must reproduce the uint64 algorithm bit for bit (wrapping, logical shifts).
    m64 = (1 << 64) - 1

    def reference(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    xs = [0, 1, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF, -987654321]
    assert [v & m64 for v in _mix(torch.tensor(xs)).tolist()] == [reference(x & m64) for x in xs]


@pytest.mark.parametrize("p", [0.15, 1 / 3, 0.001, 2**-24, 1 - 2**-24])
def test_row_seeded_choice_on_integers_is_uniform_below_p(p):
    """The plain path compares the hash's top 24 bits with an integer; whole words compare the float
    uniform with p. Both must choose the same positions, for p that is not a multiple of 2**-24
    too."""
    draws = masking._RowSeededDraws(
        row_seeds_for(0, torch.arange(64)), 64, 1024, torch.device("cpu")
    )
    expected = (draws.choice_uniforms().view(-1) < p).nonzero().squeeze(1)
    assert torch.equal(draws.choose(p), expected)


def test_mask_eval_blocks_slice_equals_slice_of_whole():
    blocks = make_blocks(40, 64, seed=3)
    whole = mask_eval_blocks(blocks, seed=11, **KW)
    part = mask_eval_blocks(blocks[10:20], seed=11, block_indices=torch.arange(10, 20), **KW)
    assert torch.equal(part[0], whole[0][10:20]) and torch.equal(part[1], whole[1][10:20])
    again = mask_eval_blocks(blocks, seed=11, **KW)
    assert torch.equal(again[1], whole[1])
    assert not torch.equal(mask_eval_blocks(blocks, seed=12, **KW)[1], whole[1])


@pytest.mark.parametrize("min_one", [False, True])
def test_static_chooses_exactly_k_per_row(min_one):
    ids = make_blocks(300, 64, seed=4, max_pad=60)  # real lengths 1..62: k runs from 0 to 9
    seeds = row_seeds_for(0, torch.arange(300))
    _, labels = mask_tokens(ids, **KW, static=True, min_one=min_one, row_seeds=seeds)
    for n_real, n_chosen in zip(
        candidates(ids).sum(1).tolist(), (labels != IGNORE_INDEX).sum(1).tolist()
    ):
        k = round(0.15 * n_real)
        assert n_chosen == (max(k, 1) if min_one and n_real else k)


def test_static_whole_words_never_exceed_k():
    ids = make_blocks(300, 128, seed=5, max_pad=100)
    word_starts = make_word_starts(ids, seed=5)
    seeds = row_seeds_for(0, torch.arange(300))
    _, labels = mask_tokens(ids, **KW, static=True, word_starts=word_starts, row_seeds=seeds)
    chosen, cand = labels != IGNORE_INDEX, candidates(ids)
    for row in range(300):
        # Words of this row as lists of positions: a candidate starts a word after a word start or a
        # special.
        words = []
        for t in range(128):
            if cand[row, t]:
                if word_starts[row, t] or not cand[row, t - 1]:
                    words.append([])
                words[-1].append(t)
        k = max(round(0.15 * sum(map(len, words))), 1)
        picked = [w for w in words if chosen[row, w].any()]
        assert all(chosen[row, w].all() for w in picked)  # whole words only
        n = sum(map(len, picked))
        # Words are taken in random order until the next would overflow k, so the gap is shorter
        # than a word.
        assert k - max(map(len, words)) < n <= k


@pytest.mark.parametrize("kind", ["generator", "row_seeds", "whole_words"])
def test_min_one_gives_short_rows_a_target(kind):
    # 3 real tokens: P(none chosen) ~ 0.61
    row = torch.tensor([CLS, 10, 11, 12, SEP, PAD, PAD, PAD])
    ids = row.repeat(2000, 1)
    ids[-1] = PAD  # a row with no candidate at all gets nothing, and no error

    def chosen_in(min_one: bool) -> torch.Tensor:
        kw = randomness("generator" if kind == "generator" else "row_seeds", 2000)
        if kind == "whole_words":
            # Two words: [10 11] and [12].
            kw["word_starts"] = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool).repeat(
                2000, 1
            )
        return mask_tokens(ids, **KW, **kw, min_one=min_one)[1] != IGNORE_INDEX

    chosen = chosen_in(True)
    assert (chosen[:-1].sum(1) >= 1).all() and not chosen[-1].any()
    # The rescue pick is uniform: tokens 10 and 12 (first pieces of the two words) are chosen
    # equally often, ~700 (tokens) or ~1000 (words) times; 15% apart is over 4 standard deviations.
    assert chosen[:, 1].sum().item() == pytest.approx(chosen[:, 3].sum().item(), rel=0.15)
    # Without min_one, most such rows would have nothing to predict.
    assert (chosen_in(False).sum(1) == 0).float().mean() > 0.3


@pytest.mark.parametrize("kind", ["generator", "row_seeds"])
def test_rescued_tokens_still_split_80_10_10(kind):
    """A token chosen by the min_one rescue is shown as [MASK] / random / itself like any other."""
    # one candidate: rescued whenever not drawn (85%)
    ids = torch.tensor([CLS, 10, SEP]).repeat(40000, 1)
    masked, labels = mask_tokens(ids, **KW, **randomness(kind, 40000))
    _, as_mask, as_random, kept = stats(ids, masked, labels)
    assert (labels[:, 1] == 10).all()
    assert (
        abs(as_mask - 0.8) < SPLIT_TOL
        and abs(as_random - 0.1) < SPLIT_TOL
        and abs(kept - 0.1) < SPLIT_TOL
    )


def hf_collator():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, V)]
    vocab = {name: i for i, name in enumerate(names)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    assert len(tokenizer) == V and sorted(tokenizer.all_special_ids) == SPECIAL
    return transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)


def test_statistics_match_hf_collator(big):
    batch = hf_collator()(list(big))  # HF finds the specials itself, from the tokenizer
    hf = stats(big, batch["input_ids"], batch["labels"])
    ours = stats(big, *mask_tokens(big, **KW, generator=torch.Generator().manual_seed(0)))
    for expected, tol, a, b in zip((0.15, 0.8, 0.1, 0.1), (RATE_TOL,) + (SPLIT_TOL,) * 3, hf, ours):
        assert a == pytest.approx(expected, abs=tol) and b == pytest.approx(expected, abs=tol)
        assert a == pytest.approx(b, abs=tol)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"mlm_probability": 0.0}, r"mlm_probability must be strictly between 0 and 1, got 0.0"),
        ({"mlm_probability": 1.0}, r"mlm_probability must be strictly between 0 and 1, got 1.0"),
        ({"mask_replace_prob": -0.1}, r"mask_replace_prob must be in \[0, 1\], got -0.1"),
        ({"random_replace_prob": 1.5}, r"random_replace_prob must be in \[0, 1\], got 1.5"),
        (
            {"mask_replace_prob": 0.8, "random_replace_prob": 0.3},
            r"mask_replace_prob \+ random_replace_prob = .* exceeds 1",
        ),
        ({"mask_token_id": V}, r"mask_token_id 1000 is outside \[0, 1000\)"),
        (
            {"word_starts": torch.ones(2, 5, dtype=torch.bool)},
            r"word_starts is \(2, 5\) but input_ids \(2, 8\)",
        ),
        ({"word_starts": torch.ones(2, 8, dtype=torch.long)}, r"word_starts must be a bool tensor"),
        (
            {"attention_mask": torch.ones(3, 8)},
            r"attention_mask is \(3, 8\) but input_ids \(2, 8\)",
        ),
        (
            {"row_seeds": torch.zeros(3, dtype=torch.long)},
            r"row_seeds must be int64 of shape \(2,\)",
        ),
        ({"row_seeds": torch.zeros(2)}, r"row_seeds must be int64 of shape \(2,\)"),
        (
            {"row_seeds": torch.zeros(2, dtype=torch.long), "generator": torch.Generator()},
            r"pass either generator or row_seeds, not both",
        ),
    ],
)
def test_bad_arguments_raise_input_error(bad, message):
    with pytest.raises(InputError, match=message):
        mask_tokens(make_blocks(2, 8), **{**KW, **bad})


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match=r"input_ids must be a 2-D torch.long tensor \(B, T\)"):
        mask_tokens(make_blocks(2, 8).int(), **KW)
    with pytest.raises(InputError, match=r"input_ids must be a 2-D torch.long tensor \(B, T\)"):
        mask_tokens(make_blocks(1, 8)[0], **KW)
    with pytest.raises(InputError, match=r"mask_eval_blocks derives row_seeds from seed"):
        mask_eval_blocks(make_blocks(2, 8), seed=0, generator=torch.Generator(), **KW)


def test_preview_shows_text_and_targets(big):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, V)]
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    masked = torch.tensor([[CLS, MASK, 99, 12, SEP]])
    labels = torch.tensor([[IGNORE_INDEX, 10, 11, 12, IGNORE_INDEX]])
    assert preview(decode, masked, labels) == (
        ">>> [CLS] [MASK] w99 w12 [SEP]\n    targets: w10 | w11 (saw 'w99') | w12 (kept)"
    )
    assert preview(decode, *mask_tokens(big, **KW), n=2).count("\n>>> ") == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_row_seeds_give_same_masks_on_cpu_and_cuda():
    ids = make_blocks(64, 256, max_pad=40)
    word_starts = make_word_starts(ids)
    for options in ({}, {"word_starts": word_starts, "static": True}):
        seeds = row_seeds_for(0, torch.arange(64))
        cpu = mask_tokens(ids, **KW, **options, row_seeds=seeds)
        cuda_options = {
            k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in options.items()
        }
        cuda_seeds = row_seeds_for(0, torch.arange(64, device="cuda"))
        gpu = mask_tokens(ids.cuda(), **KW, **cuda_options, row_seeds=cuda_seeds)
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


def test_public_name():
    import mlm

    ids = make_blocks(4, 32)
    masked, labels = mlm.mask_tokens(ids, generator=torch.Generator().manual_seed(0), **KW)
    assert masked.shape == labels.shape == ids.shape and (labels != IGNORE_INDEX).any()
