"""``multimae tokenizer``: train a WordPiece tokenizer for the caption modality.

    multimae tokenizer train --input captions.txt --vocab-size 1000 --out tokenizer.json
    multimae tokenizer train --synthetic 2000 --out tokenizer.json
"""
from __future__ import annotations

import argparse

from multimae.cli.options import command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train a WordPiece tokenizer for captions")
    actions = p.add_subparsers(dest="tokenizer_action", metavar="ACTION", required=True)
    t = command(actions, "train", _train, help="learn an uncased WordPiece vocabulary and write tokenizer.json")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="text file, one caption per line")
    src.add_argument("--synthetic", type=int, metavar="N", help="use the captions of N synthetic scenes")
    t.add_argument("--seed", type=int, default=0, help="synthetic scene stream (with --synthetic)")
    t.add_argument("--vocab-size", type=int, default=1000)
    t.add_argument("--min-frequency", type=int, default=1, help="pairs seen fewer times are not merged")
    t.add_argument("--out", required=True, help="output tokenizer.json")


def _train(args: argparse.Namespace) -> int:
    from multimae.data.tokenizers import captions_from_file, save_tokenizer, synthetic_captions, train_wordpiece

    if args.input:
        texts = captions_from_file(args.input)
    else:
        from multimae.data.synthetic import scene_vocabulary

        texts = [*scene_vocabulary(), *synthetic_captions(args.synthetic, seed=args.seed)]
    tok = train_wordpiece(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    path = save_tokenizer(tok, args.out)
    print(f"wrote {path}: {tok.get_vocab_size()} tokens ([PAD] = {tok.token_to_id('[PAD]')})")
    return 0
