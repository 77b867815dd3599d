"""Tokenizers: training, saving/loading (tokenizer.json and BERT vocab.txt), the TextEncoder
batch contract, overflow and out-of-vocabulary policies, the synthetic tokenizer, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from multimae.data.errors import DataError
from multimae.data.tokenizers import (TextEncoder, default_synthetic_tokenizer, load_tokenizer, save_tokenizer,
                                      synthetic_captions, train_wordpiece)

CAPTIONS = ["A red cube on a table.", "Two blue spheres, left of the red cube.", "the table is wooden",
            "a cube and a sphere"] * 3


def test_train_save_load_roundtrip(tmp_path):
    tok = train_wordpiece(CAPTIONS, vocab_size=200)
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("[UNK]") == 1 and tok.token_to_id("[MASK]") == 2
    assert tok.get_vocab_size() <= 200
    enc = tok.encode("A RED cube, on the Table.", add_special_tokens=False)
    assert enc.tokens == ["a", "red", "cube", ",", "on", "the", "table", "."]  # uncased, BERT punctuation split
    path = save_tokenizer(tok, tmp_path / "sub" / "tokenizer.json")
    again = load_tokenizer(path)
    assert again.to_str() == tok.to_str()
    assert load_tokenizer(tmp_path / "sub").get_vocab() == tok.get_vocab()  # a directory works too
    # a small budget gives sub-word pieces that still cover every word
    small = train_wordpiece(CAPTIONS, vocab_size=40)
    assert small.get_vocab_size() <= 45
    assert "[UNK]" not in small.encode("spheres wooden", add_special_tokens=False).tokens


def test_training_is_deterministic_across_processes():
    code = ("from multimae.data.tokenizers import train_wordpiece;"
            f"print(train_wordpiece({CAPTIONS!r}, vocab_size=60).to_str())")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == train_wordpiece(CAPTIONS, vocab_size=60).to_str().strip()


def test_bert_vocab_txt(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", ".", "dog"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    enc = TextEncoder(tok, max_len=8)
    out = enc(["The cats sat on the MAT.", "The zebra"])
    assert out["ids"][0].tolist() == [5, 6, 10, 7, 8, 5, 9, 11]  # no [CLS]/[SEP]; "cats" -> cat ##s
    assert out["ids"][1, :2].tolist() == [5, 1] and out["pad"][1].tolist() == [False] * 2 + [True] * 6
    assert enc.decode(out["ids"], out["pad"]) == ["the cats sat on the mat.", "the [UNK]"]
    assert enc.vocab_size == len(vocab) and enc.pad_id == 0


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(bad)
    (tmp_path / "vocab.txt").write_text("the\ncat\n")
    with pytest.raises(ValueError, match=r"vocab.txt: the vocabulary has no \[UNK\]"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: directory holds neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path / "empty")


def test_encoder_contract_and_missing_text():
    enc = TextEncoder(train_wordpiece(CAPTIONS, vocab_size=200), max_len=6)
    out = enc(["a red cube", None, ""])
    assert out["ids"].dtype == torch.int64 and out["ids"].shape == (3, 6)
    assert out["pad"].dtype == torch.bool and out["present"].tolist() == [True, False, False]
    assert out["pad"][0].tolist() == [False] * 3 + [True] * 3 and bool(out["pad"][1:].all())
    assert bool((out["ids"][out["pad"]] == 0).all())
    with pytest.raises(ValueError, match="overflow"):
        TextEncoder(enc.tokenizer, overflow="drop")


def test_long_caption_truncate_or_error():
    tok = train_wordpiece(CAPTIONS, vocab_size=200)
    long = "a red cube on a table and a blue sphere on the table"
    out = TextEncoder(tok, max_len=5)([long])
    assert not bool(out["pad"].any()) and TextEncoder(tok, 5).decode(out["ids"]) == ["a red cube on a"]
    with pytest.raises(DataError, match=r"caption 'a red cube on a table and a blue sphere \.\.\.' has 13 tokens, "
                                        r"more than max_len=5"):
        TextEncoder(tok, max_len=5, overflow="error")([long])


def test_unknown_words_keep_or_error():
    tok = train_wordpiece(CAPTIONS, vocab_size=200)
    out = TextEncoder(tok, max_len=8)(["a zebra and a quokka"])
    assert out["ids"][0, :5].tolist() == [tok.token_to_id(t) for t in ["a", "[UNK]", "and", "a", "[UNK]"]]
    with pytest.raises(DataError, match=r"out-of-vocabulary word\(s\) \['quokka', 'zebra'\]"):
        TextEncoder(tok, max_len=8, unk="error")(["a zebra and a quokka"])


def test_synthetic_tokenizer_covers_every_caption_word():
    from multimae.data.synthetic import scene_vocabulary

    tok = default_synthetic_tokenizer()
    assert tok.get_vocab_size() < 200 and tok.token_to_id("[PAD]") == 0
    vocab = tok.get_vocab()
    assert all(w in vocab for w in scene_vocabulary())
    enc = TextEncoder(tok, max_len=64, overflow="error", unk="error")
    caps = synthetic_captions(24, seed=3)
    out = enc(caps)  # raises on any unknown word or overflow
    assert bool(out["present"].all())
    assert enc.decode(out["ids"], out["pad"]) == [c.lower() for c in caps]
    assert default_synthetic_tokenizer().to_str() == tok.to_str()


def test_cli_train(tmp_path, capsys):
    from multimae.cli.main import main

    src = tmp_path / "captions.txt"
    src.write_text("\n".join(CAPTIONS) + "\n\n")
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "100", "--out", str(tmp_path / "t.json")]) == 0
    assert load_tokenizer(tmp_path / "t.json").to_str() == train_wordpiece(CAPTIONS, vocab_size=100).to_str()
    assert main(["tokenizer", "train", "--synthetic", "8", "--out", str(tmp_path / "s.json")]) == 0
    assert "tokens ([PAD] = 0)" in capsys.readouterr().out
