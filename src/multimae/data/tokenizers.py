"""Text tokenizers for the caption modality (M3AE), built on the ``tokenizers`` library.

* :func:`load_tokenizer` reads a ``tokenizer.json`` or a BERT ``vocab.txt`` (uncased WordPiece:
  BERT normaliser with lowercasing, BERT pre-tokeniser, ``##`` continuation pieces).
* :func:`train_wordpiece` learns a WordPiece vocabulary from captions. The merges are computed
  here, deterministically (the ``tokenizers`` trainer numbers pieces in hash-map order, so its
  vocabulary changes from one process to the next); the result is an ordinary
  ``tokenizers.Tokenizer`` that saves to ``tokenizer.json``.
* :class:`TextEncoder` turns a list of captions into the batch contract of a text modality:
  ids int64 (B, L), pad bool (B, L) (True = padding), present bool (B,). No special tokens are
  added ([CLS]/[SEP]), as in M3AE.
* :func:`default_synthetic_tokenizer`: the small vocabulary of the synthetic scenes' captions.
"""
from __future__ import annotations

import functools
import heapq
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import Tensor

from multimae.data.errors import DataError

PAD, UNK, MASK = "[PAD]", "[UNK]", "[MASK]"
BERT_SPECIAL_TOKENS = (PAD, UNK, "[CLS]", "[SEP]", MASK)
CONTINUATION = "##"


def _bert_normalizer() -> normalizers.Normalizer:
    """BERT uncased: clean control characters, space CJK, lowercase and strip accents."""
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def _from_vocab(vocab: dict[str, int], special_tokens: Sequence[str]) -> Tokenizer:
    """A WordPiece tokenizer of ``vocab`` with the BERT-uncased text pipeline."""
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION))
    tok.normalizer = _bert_normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION)
    tok.add_special_tokens([t for t in special_tokens if t in vocab])
    return tok


def _read_vocab_txt(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            token = line.rstrip("\r\n")
            if not token:
                raise ValueError(f"{path}: line {line_no} is empty; a vocab.txt holds one token per line")
            if token in vocab:
                raise ValueError(f"{path}: token {token!r} on line {line_no} already appears on line "
                                 f"{vocab[token] + 1}")
            vocab[token] = len(vocab)
    if not vocab:
        raise ValueError(f"{path}: empty vocabulary")
    if UNK not in vocab:
        raise ValueError(f"{path}: the vocabulary has no {UNK} token (WordPiece needs it for unknown words)")
    return vocab


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizer.json`` (any ``tokenizers`` tokenizer) or a BERT ``vocab.txt`` (uncased WordPiece).

    A directory is searched for ``tokenizer.json``, then ``vocab.txt``. Raises FileNotFoundError
    or ValueError naming the path when it is missing or not a valid tokenizer.
    """
    p = Path(path)
    if p.is_dir():
        found = next((p / n for n in ("tokenizer.json", "vocab.txt") if (p / n).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{p}: directory holds neither tokenizer.json nor vocab.txt")
        p = found
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {p} not found (expected a tokenizer.json or a BERT vocab.txt)")
    if p.suffix.lower() == ".txt":
        try:
            return _from_vocab(_read_vocab_txt(p), BERT_SPECIAL_TOKENS)
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not a UTF-8 vocab.txt ({e})") from None
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ValueError(f"{p}: not a valid tokenizer.json ({type(e).__name__}: {e})") from None


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``tok`` as a ``tokenizer.json`` (atomically; parent directories are created)."""
    from multimae.core.io import save_file_atomic

    return save_file_atomic(path, lambda tmp: tok.save(str(tmp), pretty=True))


# --- training --------------------------------------------------------------------------------------


def _merge_word(symbols: list[str], a: str, b: str, merged: str) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _pairs(symbols: list[str]) -> Counter:
    return Counter(zip(symbols, symbols[1:]))


def _learn_pieces(word_counts: dict[str, int], budget: int, min_frequency: int) -> list[str]:
    """Alphabet, then merged pieces in merge order, until ``budget`` pieces or no frequent pair.

    Pair selection is by frequency, ties broken by the pair's strings, so the result depends only
    on the word counts. Pair counts are updated incrementally (only words holding the pair).
    """
    words = sorted(word_counts)
    freq = [word_counts[w] for w in words]
    split = [[w[0]] + [CONTINUATION + c for c in w[1:]] for w in words]
    pieces = sorted({s for sym in split for s in sym}, key=lambda s: (s.startswith(CONTINUATION), s))
    known = set(pieces)
    counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, sym in enumerate(split):
        for pair, n in _pairs(sym).items():
            counts[pair] += n * freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    while heap and len(pieces) < budget:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale entry
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b[len(CONTINUATION):]
        if merged not in known:
            known.add(merged)
            pieces.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            old = _pairs(split[i])
            split[i] = _merge_word(split[i], a, b, merged)
            new = _pairs(split[i])
            for p in old.keys() | new.keys():
                delta = (new.get(p, 0) - old.get(p, 0)) * freq[i]
                if delta:
                    counts[p] += delta
                    changed.add(p)
                if p in new:
                    where.setdefault(p, set()).add(i)
                elif p in where:
                    where[p].discard(i)
        counts.pop(pair, None)
        for p in changed:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
    return pieces


def train_wordpiece(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1,
                    special_tokens: Sequence[str] = (PAD, UNK, MASK)) -> Tokenizer:
    """Learn an uncased WordPiece tokenizer from ``texts``; deterministic for the same texts.

    The vocabulary is ``special_tokens`` ([PAD] first, so its id is 0), every character seen (as a
    word start and as a ``##`` continuation), then pieces merged by pair frequency (pairs seen
    fewer than ``min_frequency`` times are not merged) until ``vocab_size`` tokens. When the
    corpus needs fewer, the vocabulary is smaller: every word seen is then a single token.
    """
    special_tokens = list(special_tokens)
    if not special_tokens or special_tokens[0] != PAD or UNK not in special_tokens:
        raise ValueError(f"special_tokens must start with {PAD} (id 0) and contain {UNK}, got {special_tokens}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    norm, pre = _bert_normalizer(), pre_tokenizers.BertPreTokenizer()
    word_counts: Counter = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_wordpiece: texts must be str, got {type(text).__name__}")
        word_counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    pieces = _learn_pieces(dict(word_counts), vocab_size - len(special_tokens), min_frequency)
    vocab = {t: i for i, t in enumerate(special_tokens)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    return _from_vocab(vocab, special_tokens)


def captions_from_file(path: str | os.PathLike) -> Iterator[str]:
    """Non-empty lines of a UTF-8 text file, one caption per line (stripped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"caption file {p} not found")
    with open(p, encoding="utf-8") as f:
        yield from (line for line in map(str.strip, f) if line)


def synthetic_captions(num: int, seed: int = 0, image_size: int = 32) -> list[str]:
    """Captions of the first ``num`` synthetic scenes of stream ``seed`` (rendered small)."""
    from multimae.data.synthetic import SyntheticScenes

    ds = SyntheticScenes(num, image_size=image_size, seed=seed, modalities=["caption"])
    return [ds[i]["caption"] for i in range(num)]


@functools.lru_cache(maxsize=1)
def _synthetic_tokenizer_json() -> str:
    from multimae.data.synthetic import scene_vocabulary

    tok = train_wordpiece([*scene_vocabulary(), *synthetic_captions(256, seed=0)], vocab_size=1000)
    return tok.to_str()


def default_synthetic_tokenizer() -> Tokenizer:
    """WordPiece tokenizer of the synthetic scenes' captions (every caption word is one token).

    Trained here, offline and deterministically, on ``scene_vocabulary()`` plus 256 generated
    captions; about 120 tokens. Computed once per process.
    """
    return Tokenizer.from_str(_synthetic_tokenizer_json())


# --- encoding ---------------------------------------------------------------------------------------


class TextEncoder:
    """Captions -> the text batch contract (no special tokens added, as in M3AE).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary has ``[PAD]``.
        max_len: L, the padded length.
        overflow: ``truncate`` captions longer than ``max_len`` tokens, or ``error`` (DataError
            quoting the caption's start and its token count).
        unk: ``keep`` out-of-vocabulary words as ``[UNK]``, or ``error`` (DataError naming them).

    ``encoder(texts)`` with ``texts: list[str | None]`` returns ``ids`` int64 (B, L), ``pad`` bool
    (B, L) (True = padding) and ``present`` bool (B,) (False for None or a caption with no token;
    such rows are all padding).
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int = 64, overflow: Literal["truncate", "error"] = "truncate",
                 unk: Literal["keep", "error"] = "keep") -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if overflow not in ("truncate", "error"):
            raise ValueError(f"overflow must be 'truncate' or 'error', got {overflow!r}")
        if unk not in ("keep", "error"):
            raise ValueError(f"unk must be 'keep' or 'error', got {unk!r}")
        pad_id = tokenizer.token_to_id(PAD)
        if pad_id is None:
            raise ValueError(f"the tokenizer has no {PAD} token; TextEncoder pads with it")
        self.tokenizer, self.max_len, self.overflow, self.unk = tokenizer, max_len, overflow, unk
        self.pad_id: int = pad_id
        unk_token = getattr(tokenizer.model, "unk_token", None)
        self.unk_id: int | None = tokenizer.token_to_id(unk_token) if unk_token else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the text spec's ``num_classes``)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _check(self, text: str, enc: object) -> list[int]:
        ids: list[int] = list(enc.ids)  # type: ignore[attr-defined]
        if self.unk == "error" and self.unk_id is not None and self.unk_id in ids:
            offsets = enc.offsets  # type: ignore[attr-defined]
            words = sorted({text[offsets[i][0]:offsets[i][1]] for i, t in enumerate(ids) if t == self.unk_id})
            raise DataError(f"caption {_quote(text)} has out-of-vocabulary word(s) {words} (unk='error'; "
                            f"use unk='keep' to map them to {UNK})")
        if len(ids) > self.max_len:
            if self.overflow == "error":
                raise DataError(f"caption {_quote(text)} has {len(ids)} tokens, more than max_len={self.max_len} "
                                "(overflow='error'; use overflow='truncate' to cut it)")
            ids = ids[: self.max_len]
        return ids

    def __call__(self, texts: Sequence[str | None]) -> dict[str, Tensor]:
        B, L = len(texts), self.max_len
        ids = torch.full((B, L), self.pad_id, dtype=torch.int64)
        pad = torch.ones(B, L, dtype=torch.bool)
        present = torch.zeros(B, dtype=torch.bool)
        rows = [i for i, t in enumerate(texts) if t is not None]
        for i in rows:
            if not isinstance(texts[i], str):
                raise TypeError(f"text {i} is a {type(texts[i]).__name__}, expected str or None")
        encodings = self.tokenizer.encode_batch([texts[i] for i in rows], add_special_tokens=False) if rows else []
        for i, enc in zip(rows, encodings):
            row = self._check(texts[i], enc)  # type: ignore[arg-type]
            if row:
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
                pad[i, : len(row)] = False
                present[i] = True
        return {"ids": ids, "pad": pad, "present": present}

    def decode(self, ids: Tensor, pad: Tensor | None = None) -> list[str]:
        """Token ids (B, L) -> captions, skipping padding (``pad`` (B, L), default ``ids == pad_id``)."""
        if ids.ndim == 1:
            ids = ids[None]
            pad = None if pad is None else pad[None]
        keep = ~pad.bool() if pad is not None else ids != self.pad_id
        return [self.tokenizer.decode(row[k].tolist(), skip_special_tokens=False) for row, k in zip(ids, keep)]


def _quote(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
