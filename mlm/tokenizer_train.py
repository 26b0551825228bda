"""Training a tokenizer on a corpus: a vocabulary learnt from text, put into the pipeline
`Tokenizer` loads.

A trainer learns only the vocabulary (and, for BPE, the merges; for unigram, the scores). The result
is then rebuilt by the same builders that load pretrained tokenizers (`build_wordpiece`,
`build_byte_level_bpe` in mlm/tokenizer.py, `set_deberta_pipeline` in mlm/spm.py), so a trained
tokenizer and a downloaded one run the identical normalise → split → model → special-token pipeline,
and `transformers.AutoTokenizer` loads a saved one with the same ids.

Special tokens take the first ids, in each family's order:
  wordpiece  [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4  (BERT's vocab.txt has them at 0, 100..103)
  bpe        <s> <pad> </s> <unk> <mask>    = 0..4  (RoBERTa's first four; its <mask> is last)
  unigram    [PAD] [CLS] [SEP] [UNK] [MASK] = 0..4  (DeBERTa-v3's first four; its [MASK] is last)
Our <mask> and [MASK] are 4, so every kind keeps its special ids below the pieces.

Determinism: the same texts and settings give a byte-identical tokenizer.json in every process, with
any number of threads, whatever order the documents come in.
  bpe        `tokenizers`' BpeTrainer already is: its alphabet is sorted by code point, and a tie
             between equally frequent pairs goes to the pair of smaller ids.
  wordpiece  WordPieceTrainer is that BPE trainer with "##" before every character after a word's
             first, and it numbers those "##c" symbols in the hash-map order of the words, so ties
             break differently in each process. We count the words ourselves and hand the trainer
             every "##c" up front, sorted, as if they were special tokens: their ids are fixed
             before the first merge. In the saved tokenizer they are plain vocabulary entries; only
             the five real special tokens are added tokens.
  unigram    our own trainer below: `tokenizers`' UnigramTrainer is not deterministic even on one
             thread.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from tokenizers import (
    AddedToken,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import (
    Tokenizer as Backend,
)

from mlm.errors import ConfigError, DataError
from mlm.spm import set_deberta_pipeline
from mlm.tokenizer import (
    DEFAULT_SPECIALS,
    Tokenizer,
    build_byte_level_bpe,
    build_modernbert_bpe,
    build_wordpiece,
)

SPECIAL_ORDER = {
    "wordpiece": ("pad", "unk", "cls", "sep", "mask"),
    "bpe": ("cls", "pad", "sep", "unk", "mask"),
    "unigram": ("pad", "cls", "sep", "unk", "mask"),
}
# BERT's, RoBERTa's, DeBERTa-v3's
DEFAULT_VOCAB_SIZE = {"wordpiece": 30522, "bpe": 50265, "unigram": 128000}
# Lower-cased unless told otherwise: BERT's WordPiece yes (bert-base-uncased), DeBERTa-v3's unigram
# no.
DEFAULT_LOWERCASE = {"wordpiece": True, "bpe": False, "unigram": False}


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int | None = None,
    *,
    lowercase: bool | None = None,
    min_frequency: int = 2,
    family: str | None = None,
) -> Tokenizer:
    """Train a BERT-style WordPiece, RoBERTa-style byte-level BPE or DeBERTa-style unigram
    vocabulary; family "modernbert" makes the byte-level BPE ModernBERT's (its special tokens after
    the pieces, [CLS] ... [SEP]).

    vocab_size counts the special tokens and defaults to BERT's 30522, RoBERTa's 50265 or
    DeBERTa-v3's 128000; a small corpus gives fewer. `lowercase` defaults to the family's choice:
    WordPiece lower-cases, unigram keeps case (True saves `do_lower_case` for DebertaV2Tokenizer);
    byte-level BPE always keeps case, as RoBERTa does. min_frequency: a merge (WordPiece, BPE) or a
    seed piece (unigram) must be seen that often. texts is read once; a Corpus names itself in the
    error when it holds no documents."""
    if kind not in DEFAULT_SPECIALS:
        raise ConfigError(f"tokenizer kind must be wordpiece, bpe or unigram, not {kind!r}")
    specials = DEFAULT_SPECIALS[kind]
    special_tokens = [specials[role] for role in SPECIAL_ORDER[kind]]
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE[kind]
    lowercase = DEFAULT_LOWERCASE[kind] if lowercase is None else lowercase
    # Byte-level BPE starts from all 256 bytes; below that it could not spell every text.
    smallest = len(special_tokens) + (256 if kind == "bpe" else 1)
    if vocab_size < smallest:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for {kind}; pass --vocab-size {smallest} or more"
        )
    source = getattr(texts, "description", "the texts given")
    empty = DataError(
        f"no documents in {source} to train a tokenizer on; check --data and --text-field"
    )

    if kind == "bpe":
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = iter(texts)
        # the vocabulary always holds the 256 bytes: look for a text instead
        first = next(texts, None)
        if first is None:
            raise empty
        if family == "modernbert":  # the pieces only: the special tokens go after them
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size - len(special_tokens),
                min_frequency=min_frequency,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            backend.normalizer = normalizers.NFC()
        backend.train_from_iterator(itertools.chain([first], texts), trainer)
        trained = json.loads(backend.to_str())["model"]
        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]
        ]
        if family == "modernbert":
            rebuilt, specials = build_modernbert_bpe(trained["vocab"], merges)
            config = {"add_prefix_space": False, "tokenizer_class": "PreTrainedTokenizerFast"}
            return Tokenizer(rebuilt, specials, extra_config=config)
        rebuilt = build_byte_level_bpe(trained["vocab"], merges, specials, mask_lstrip=True)
        return Tokenizer(rebuilt, specials, extra_config={"add_prefix_space": False})

    if kind == "wordpiece":
        splitter = Backend(models.WordPiece(unk_token=specials["unk"]))
        splitter.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        splitter.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        counts = count_words(texts, splitter)
        if not counts:
            raise empty
        vocab = train_wordpiece(counts, vocab_size, special_tokens, min_frequency=min_frequency)
        rebuilt = build_wordpiece(vocab, specials, lowercase=lowercase)
        return Tokenizer(rebuilt, specials, extra_config={"do_lower_case": lowercase})

    # DeBERTa-v3's
    flags = {"do_lower_case": lowercase, "split_by_punct": False, "add_prefix_space": True}
    splitter = Backend(models.Unigram())
    set_deberta_pipeline(splitter, **flags)
    counts = count_words(texts, splitter)
    if not counts:
        raise empty
    pieces = train_unigram(
        counts,
        vocab_size - len(special_tokens),
        min_frequency=min_frequency,
        reserved=special_tokens,
    )
    rebuilt = build_unigram(pieces, specials, special_tokens, flags)
    unk_id = special_tokens.index(specials["unk"])
    return Tokenizer(rebuilt, specials, extra_config={**flags, "unk_id": unk_id})


def count_words(texts: Iterable[str], splitter: Backend) -> dict[str, int]:
    """How often each word occurs, words being what the splitter's normaliser and pre-tokenizer make
    of a text (exactly what its trainer would count); in first-seen order, which no trainer below
    depends on."""
    normalize, split = splitter.normalizer.normalize_str, splitter.pre_tokenizer.pre_tokenize_str
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in split(normalize(text)):
            counts[word] = counts.get(word, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------- wordpiece
def train_wordpiece(
    counts: dict[str, int], vocab_size: int, special_tokens: list[str], *, min_frequency: int = 2
) -> dict[str, int]:
    """WordPiece vocabulary (token → id) from word counts, with every "##c" numbered up front (see
    above)."""
    continuations = sorted({"##" + c for word in counts for c in word[1:]})
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens + continuations,
        show_progress=False,
    )
    # The words are normalised and split already: the trainer only has to count them again.
    backend = Backend(models.WordPiece())
    # the same whitespace BertPreTokenizer splits on
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator(_repeated(counts), trainer)
    return json.loads(backend.to_str())["model"]["vocab"]


def _repeated(counts: dict[str, int], chunk: int = 4096) -> Iterator[str]:
    """Each word as often as it was counted, a few thousand copies per string."""
    for word in sorted(counts):
        n = counts[word]
        while n > 0:
            yield " ".join([word] * min(n, chunk))
            n -= chunk


# ----------------------------------------------------------------------------- unigram
# (SentencePiece's) A unigram model gives each piece a probability, and a word is spelt by its most
# likely segmentation into pieces. Training starts from far too many pieces and removes the least
# useful ones, as SentencePiece does (Kudo 2018, "Subword Regularization"); this is our own code,
# written from that description:
# 1. seeds: every character, and the substrings of words (at most 16 characters) seen at least
#    min_frequency times and not always followed by the same character, by frequency x length; each
#    starts with a probability proportional to that product;
# 2. EM: the expected number of uses of each piece, over all segmentations of every word weighted by
#    their probability (forward-backward over the word's lattice), gives its new log-probability
#    (Bayesian: digamma instead of log); pieces expected less than half a use are dropped;
# 3. prune: a piece's loss is what the corpus log-likelihood would lose if its uses in the best
#    (Viterbi) segmentations were spelt by its own best segmentation without it. Pieces no best
#    segmentation uses go first, then those of least loss: at least a quarter of the pieces per
#    round, never the characters;
# 4. repeat 2-3 down to 1.1 x the size asked for, then keep the characters and the most probable
#    pieces. The words are laid out once as arrays (`Sequences`), every word's lattice in rows of
#    one table, and each pass is a loop over character positions that handles all words at once.
#    Ties are broken by the piece's text (piece ids are in sorted text order) and every sum runs in
#    a fixed order, so the result depends on the word counts alone: not on the order of the
#    documents, the process or the number of threads.
MAX_PIECE_LENGTH = 16  # SentencePiece's max_sentencepiece_length
SEED_SIZE = 1_000_000  # SentencePiece's seed_sentencepiece_size: substrings kept as seeds, at most
SHRINK = 0.75  # SentencePiece's shrinking_factor: each round keeps at most this share of the pieces
EM_STEPS = 2  # SentencePiece's num_sub_iterations: EM steps between two prunings
EXPECTED_MIN = 0.5  # SentencePiece's kExpectedFrequencyThreshold: fewer expected uses drop a piece
SLACK = 1.1  # SentencePiece prunes to 1.1 x the size asked for, then keeps the most probable pieces
SCORE_DECIMALS = 10  # scores are saved rounded (see train_unigram)


@dataclass
class Sequences:
    """n strings (words, or pieces) and the pieces inside them, longest string first. K =
    MAX_PIECE_LENGTH.

    Row starts[i] + t of `ids` is character t of string i; its column k holds the id of the piece
    that ends there and is k + 1 characters long, or -1. K rows of -1 at the end keep reads past the
    last string in bounds."""

    ids: np.ndarray  # (rows + K, K) int32
    starts: np.ndarray  # (n,) first row of each string
    lengths: np.ndarray  # (n,) characters in each string, non-increasing
    counts: np.ndarray  # (n,) how often each string occurs


@dataclass
class Lattice:
    """The seed pieces, and the words laid out over them."""

    pieces: list[str]  # (P,) in sorted text order: a piece's id is its index
    lengths: np.ndarray  # (P,) characters in each piece
    # (P,) row in words.ids of the first character of the piece's first occurrence
    first: np.ndarray
    seed_logp: np.ndarray  # (P,) starting log-probabilities, proportional to frequency x length
    words: Sequences


def train_unigram(
    counts: dict[str, int], n_pieces: int, *, min_frequency: int = 2, reserved: Collection[str] = ()
) -> list[tuple[str, float]]:
    """n_pieces (piece, score) pairs, most probable first, learnt from word counts; a score is the
    piece's log-probability, as SentencePiece stores it.

    Fewer when the corpus has fewer seed pieces than that. Every character of the words is a piece;
    `reserved` strings (the special tokens) never are.
    """
    lattice = build_lattice(counts, min_frequency=min_frequency, reserved=reserved)
    n_chars = int((lattice.lengths == 1).sum())
    if n_pieces < n_chars:
        raise ConfigError(
            f"the corpus has {n_chars} distinct characters, more than the {n_pieces} pieces asked "
            "for; "
            f"pass --vocab-size {n_chars + len(reserved)} or more"
        )
    # Like SentencePiece, prune to a little more than asked, then keep the most probable.
    n_train = max(n_pieces, int(n_pieces * SLACK))
    logp = lattice.seed_logp
    while True:
        for _ in range(EM_STEPS):
            logp = em_step(lattice, logp, n_train)
        if np.isfinite(logp).sum() <= n_train:
            break
        logp = prune(lattice, logp, n_train)
    kept = np.flatnonzero(np.isfinite(logp))
    # characters first
    kept = kept[np.lexsort((kept, -logp[kept], lattice.lengths[kept] > 1))][:n_pieces]
    kept = kept[np.lexsort((kept, -logp[kept]))]  # most probable first, ties in text order
    # Rounded so that tokenizer.json reads back exactly: its reader (serde_json) may miss a float
    # written with 17 digits by one bit, and a tokenizer saved after loading would then differ from
    # the one it was loaded from.
    return [(lattice.pieces[i], round(float(logp[i]), SCORE_DECIMALS)) for i in kept]


def build_lattice(
    counts: dict[str, int], *, min_frequency: int = 2, reserved: Collection[str] = ()
) -> Lattice:
    """Seed pieces (step 1 above) and the lattice of every word over them."""
    K = MAX_PIECE_LENGTH
    words = sorted((w for w in counts if w), key=lambda w: (-len(w), w))
    text = "".join(words)
    lengths = np.array([len(w) for w in words])
    word_of = np.repeat(np.arange(len(words)), lengths)  # (C,) the word each character belongs to
    word_counts = np.array([counts[w] for w in words], dtype=np.float64)
    found = _substrings(text, word_of, word_counts)

    # Seeds: every character, and the substrings seen often enough, not always followed by the same
    # character (as SentencePiece's suffix array finds them), with the largest frequency x length.
    # (-frequency x length, text, length, number among its length's substrings, row)
    chars, longer = [], []
    for length, (first, frequency, branching, _) in enumerate(found, start=1):
        for i in np.flatnonzero((frequency >= min_frequency) & branching | (length == 1)):
            piece = text[first[i] : first[i] + length]
            if piece not in reserved:
                (chars if length == 1 else longer).append(
                    (-frequency[i] * length, piece, length, i, first[i])
                )
    if len(longer) > SEED_SIZE:
        longer = sorted(longer)[:SEED_SIZE]
    seeds = sorted(chars + longer, key=lambda seed: seed[1])

    ids = np.full((len(text) + K, K), -1, dtype=np.int32)
    seed_length, seed_number = np.array([s[2] for s in seeds]), np.array([s[3] for s in seeds])
    for length, (first, _, _, number) in enumerate(found, start=1):
        # the seed id of each substring of this length
        seed_of = np.full(len(first), -1, dtype=np.int32)
        mine = np.flatnonzero(seed_length == length)
        seed_of[seed_number[mine]] = mine
        at = np.flatnonzero(number >= 0)
        ids[at + length - 1, length - 1] = seed_of[number[at]]  # the row of its last character
    score = np.array([-s[0] for s in seeds])
    return Lattice(
        pieces=[s[1] for s in seeds],
        lengths=seed_length,
        first=np.array([s[4] for s in seeds]),
        seed_logp=np.log(score) - np.log(score.sum()),
        words=Sequences(ids, np.cumsum(lengths) - lengths, lengths, word_counts),
    )


def _substrings(
    text: str, word_of: np.ndarray, word_counts: np.ndarray
) -> list[tuple[np.ndarray, ...]]:
    """The distinct substrings of 1..K characters inside words, one entry per length: (first,
    frequency, branching, number). number[g] numbers the substring that starts at character g (-1:
    it would leave the word); the rest is indexed by that number: where it first starts, how often
    the words hold it, and whether it is followed by two different characters (a word's end counting
    as one)."""
    # (C,) one code point per character
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    _, char = np.unique(codes, return_inverse=True)  # (C,) the characters numbered 0..A-1
    end = int(char.max()) + 1  # "the word ends here", as a character number
    next_char, next_word = np.append(char, end), np.append(word_of, -1)
    found, number = [], char
    for length in range(1, min(MAX_PIECE_LENGTH, len(codes)) + 1):
        # a substring is one of length - 1 and the character after it, within one word
        if length > 1:
            starts = np.flatnonzero(number[: len(codes) - length + 1] >= 0)
            starts = starts[word_of[starts] == word_of[starts + length - 1]]
            if starts.size == 0:
                break
            pairs = number[starts] * end + char[starts + length - 1]
            number = np.full(len(codes), -1)
            number[starts] = np.unique(pairs, return_inverse=True)[1]
        at = np.flatnonzero(number >= 0)
        n = int(number.max()) + 1
        first = np.full(n, len(codes))
        np.minimum.at(first, number[at], at)
        following = np.where(next_word[at + length] == word_of[at], next_char[at + length], end)
        # (substring, follower) pairs
        distinct = np.unique(number[at] * (end + 1) + following) // (end + 1)
        branching = np.bincount(distinct, minlength=n) >= 2
        found.append(
            (first, np.bincount(number[at], weights=word_counts[word_of[at]]), branching, number)
        )
    return found


def em_step(lattice: Lattice, logp: np.ndarray, n_min: int) -> np.ndarray:
    """One EM step: each kept piece's new log-probability from its expected number of uses (-inf:
    dropped).

    As in SentencePiece, the estimate is Bayesian (digamma instead of log: a sparse prior that
    discounts pieces of few expected uses) and a piece expected fewer than EXPECTED_MIN uses is
    dropped, unless it is a character or the vocabulary would shrink below n_min pieces."""
    kept = np.isfinite(logp)
    expected = expected_uses(lattice.words, logp)
    rare = np.flatnonzero(kept & (expected < EXPECTED_MIN) & (lattice.lengths > 1))
    rare = rare[np.lexsort((rare, expected[rare]))]  # least expected first, ties in text order
    kept[rare[: max(0, int(kept.sum()) - n_min)]] = False
    # a character seldom used on its own still gets a score
    expected = np.maximum(expected, EXPECTED_MIN)
    return np.where(kept, _digamma(expected) - _digamma(expected[kept].sum()), -np.inf)


def _digamma(x: np.ndarray) -> np.ndarray:
    """The digamma function, d/dx log Gamma(x), for x > 0: raise x above 10 by psi(x) = psi(x + 1) -
    1/x, then the asymptotic series (good to about 1e-11 there)."""
    x = np.array(x, dtype=np.float64)
    result = np.zeros_like(x)
    while (small := x < 10).any():
        result[small] -= 1 / x[small]
        x[small] += 1
    inv2 = 1 / (x * x)
    return result + np.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252))


def prune(lattice: Lattice, logp: np.ndarray, n_pieces: int) -> np.ndarray:
    """Drop the pieces whose loss is least (step 3 above), keeping at least n_pieces; dropped ones
    get -inf."""
    kept = np.isfinite(logp)
    is_char = lattice.lengths == 1
    words = lattice.words
    # how often each piece is in the words' best segmentations:
    string, row, k = viterbi(words, logp)
    uses = np.bincount(words.ids[row, k], weights=words.counts[string], minlength=len(logp))
    loss = _removal_loss(lattice, logp, uses, np.flatnonzero(kept & ~is_char & (uses > 0)))

    # Characters first, then the used pieces by loss, then the unused by probability; ties in text
    # order.
    rank = np.select([is_char, uses > 0], [0, 1], 2) + 3 * ~kept
    within = np.where(is_char, 0.0, np.where(uses > 0, -loss, -logp))
    order = np.lexsort((np.arange(len(logp)), within, rank))
    n_used = int((kept & (is_char | (uses > 0))).sum())
    n_keep = max(n_pieces, min(int(kept.sum() * SHRINK), n_used))
    pruned = np.full(len(logp), -np.inf)
    pruned[order[:n_keep]] = logp[order[:n_keep]]
    return pruned


def _removal_loss(
    lattice: Lattice, logp: np.ndarray, uses: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """For each candidate piece, the corpus log-likelihood lost if each of its uses were spelt
    instead by its best segmentation without it, its count moving onto those pieces (SentencePiece's
    estimate)."""
    K = MAX_PIECE_LENGTH
    loss = np.zeros(len(logp))
    if candidates.size == 0:
        return loss
    # Each candidate's own lattice: the rows of its first occurrence in a word, without the edges
    # that start before it and without the edge that is the piece itself.
    candidates = candidates[np.lexsort((candidates, -lattice.lengths[candidates]))]  # longest first
    lengths = lattice.lengths[candidates]
    starts = np.cumsum(lengths) - lengths
    at = np.repeat(np.arange(len(candidates)), lengths)  # (rows,) the candidate each row belongs to
    position = np.arange(len(at)) - starts[at]  # (rows,) character within the piece
    ids = np.full((len(at) + K, K), -1, dtype=np.int32)
    ids[: len(at)] = lattice.words.ids[lattice.first[at] + position]
    ids[: len(at)][np.arange(K)[None, :] > position[:, None]] = -1
    ids[starts + lengths - 1, lengths - 1] = -1
    string, row, k = viterbi(Sequences(ids, starts, lengths, np.ones(len(candidates))), logp)

    f, total = uses[candidates], uses.sum()
    n_parts = np.bincount(string, minlength=len(candidates))
    after = np.bincount(
        string, weights=np.log(uses[ids[row, k]] + f[string]), minlength=len(candidates)
    )
    loss[candidates] = f * (
        np.log(f) - np.log(total) - after + n_parts * np.log(total + f * (n_parts - 1))
    )
    return loss


def _scores(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Log-probabilities at the lattice's edges; -inf where there is no piece (id -1) or a dropped
    one."""
    return np.append(logp, -np.inf)[ids]


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, which always holds a finite value (every character is a
    piece)."""
    top = x.max(axis=-1, keepdims=True)
    return np.log(np.exp(x - top).sum(axis=-1)) + top[..., 0]


def _n_longer(lengths: np.ndarray) -> np.ndarray:
    """(L,) how many strings are longer than t characters, for t < the longest: with strings longest
    first, the ones still going at character t are the first n_longer[t]."""
    return len(lengths) - np.searchsorted(lengths[::-1], np.arange(lengths[0]), side="right")


def expected_uses(seqs: Sequences, logp: np.ndarray) -> np.ndarray:
    """(P,) expected uses of each piece over all segmentations of the strings, times their
    counts."""
    # (rows + K, K): row r, column k: the edge ending at r, k + 1 long
    scores = _scores(logp, seqs.ids)
    n, L, K = len(seqs.lengths), int(seqs.lengths[0]), scores.shape[1]
    rows = len(scores) - K
    # from_start[r, k] = scores[r + k, k], the edge that starts at row r and is k + 1 long: a skewed
    # view, no copy (the K padding rows keep it inside the array).
    from_start = np.lib.stride_tricks.as_strided(
        scores, (rows, K), (scores.strides[0], sum(scores.strides))
    )
    n_longer = _n_longer(seqs.lengths)
    alpha = np.full((n, L + 1), -np.inf)  # alpha[:, t]: log-probability of the first t characters
    # beta[:, t]: of the characters from t on; -inf past the end
    beta = np.full((n, L + K + 1), -np.inf)
    alpha[:, 0] = 0.0
    beta[np.arange(n), seqs.lengths] = 0.0
    for t in range(L):  # the edges that end at character t start at t, t - 1, ..., t - k + 1
        m, k = n_longer[t], min(K, t + 1)
        alpha[:m, t + 1] = _logsumexp(
            alpha[:m, t + 1 - k : t + 1][:, ::-1] + scores[seqs.starts[:m] + t, :k]
        )
    for t in range(L - 1, -1, -1):  # the edges that start at character t end at t, t + 1, ...
        m = n_longer[t]
        beta[:m, t] = _logsumexp(beta[:m, t + 1 : t + 1 + K] + from_start[seqs.starts[:m] + t])

    # Each edge's posterior: alpha where it starts + its score + beta where it ends - the string's
    # total.
    # the edges of kept pieces, in row order
    edge = np.flatnonzero(np.isfinite(scores[:rows]).ravel())
    row, k = np.divmod(edge, K)
    string = np.repeat(np.arange(n), seqs.lengths)[row]
    end = row - seqs.starts[string]  # the character the edge ends at
    log_z = alpha[np.arange(n), seqs.lengths]
    posterior = np.exp(
        alpha[string, end - k] + scores.ravel()[edge] + beta[string, end + 1] - log_z[string]
    )
    return np.bincount(
        seqs.ids.ravel()[edge], weights=posterior * seqs.counts[string], minlength=len(logp)
    )


def viterbi(seqs: Sequences, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best segmentation of every string, as its pieces: (string, row, k), the piece being
    ids[row, k].

    Of equally good segmentations, the one whose last piece is shorter wins.
    """
    scores = _scores(logp, seqs.ids)
    n, L, K = len(seqs.lengths), int(seqs.lengths[0]), scores.shape[1]
    n_longer = _n_longer(seqs.lengths)
    # best[:, t]: log-probability of the best split of the first t characters
    best = np.full((n, L + 1), -np.inf)
    best[:, 0] = 0.0
    back = np.zeros((n, L + 1), dtype=np.int64)  # back[:, t]: k of the last piece of that split
    for t in range(L):
        m, k = n_longer[t], min(K, t + 1)
        x = best[:m, t + 1 - k : t + 1][:, ::-1] + scores[seqs.starts[:m] + t, :k]
        back[:m, t + 1] = x.argmax(axis=1)
        best[:m, t + 1] = x.max(axis=1)
    string, position, pieces = np.arange(n), seqs.lengths.copy(), []
    while string.size:  # walk back from the end of every string at once
        k = back[string, position]
        pieces.append((string, seqs.starts[string] + position - 1, k))
        position = position - k - 1
        string, position = string[position > 0], position[position > 0]
    return tuple(np.concatenate(parts) for parts in zip(*pieces))


def build_unigram(
    pieces: list[tuple[str, float]],
    specials: dict[str, str],
    special_tokens: list[str],
    flags: dict,
) -> Backend:
    """DeBERTa's pipeline over trained pieces: the special tokens first (score 0, as SentencePiece
    gives its control pieces), then the pieces; [CLS] A [SEP] around a text."""
    vocab = [(token, 0.0) for token in special_tokens] + pieces
    backend = Backend(
        models.Unigram(vocab, unk_id=special_tokens.index(specials["unk"]), byte_fallback=False)
    )
    set_deberta_pipeline(backend, **flags)
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in special_tokens]
    )
    cls_token, sep_token = specials["cls"], specials["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[
            (cls_token, backend.token_to_id(cls_token)),
            (sep_token, backend.token_to_id(sep_token)),
        ],
    )
    return backend
