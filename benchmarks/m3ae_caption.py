"""M3AE on the synthetic scenes: predict a held-out scene's caption from its image alone.

Trains ``--config`` (default ``configs/pretrain/synthetic-m3ae-tiny.yaml``; ``--eval-only``
re-evaluates the trained run), then hides the whole caption, shows the whole image, and scores
the predicted colour and object-type words against frequency baselines. Writes
benchmarks/results/m3ae_caption.md.

    python benchmarks/m3ae_caption.py [--config CONFIG] [--steps 1500] [key=value overrides ...]
    python benchmarks/m3ae_caption.py --config configs/pretrain/synthetic-m3ae-multitask.yaml --steps 3000
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/pretrain/synthetic-m3ae-tiny.yaml",
                    help="training config (e.g. configs/pretrain/synthetic-m3ae-multitask.yaml)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/m3ae_caption.md"))
    ap.add_argument("--eval-only", action="store_true", help="evaluate the existing run (no training)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from multimae.core.config import load_config
    from multimae.data.synthetic import COLORS, OBJECT_TYPES
    from multimae.evaluation.text_eval import caption_word_accuracy, caption_word_recall
    from multimae.tasks.pretrain_config import PretrainConfig
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask
    from multimae.data.loader import BatchSpec, eval_batches, load_text_tokenizer, text_collator
    from multimae.data.synthetic import SyntheticScenes

    overrides = [f"train.max_steps={args.steps}", "train.run_name=m3ae-caption-bench", "train.out_dir=runs",
                 "train.resume=auto" if args.eval_only else "train.resume=null", *args.overrides]
    cfg = load_config(PretrainConfig, str(ROOT / args.config), overrides)
    per_epoch = cfg.data.num_samples // cfg.train.batch_size
    cfg.train.epochs = -(-args.steps // per_epoch)  # the cosine schedule ends with the run
    t0 = time.time()
    trainer = Trainer(PretrainTask(cfg))
    if not args.eval_only:
        trainer.fit(evaluate=False)  # scored below
    train_s = time.time() - t0
    model = trainer.model.eval()
    tok = load_text_tokenizer(cfg.data.tokenizer)
    classes = {"colour": [tok.token_to_id(w) for w in COLORS], "object type": [tok.token_to_id(w) for w in OBJECT_TYPES]}
    assert all(i is not None for v in classes.values() for i in v), "synthetic words must be single tokens"
    collate = text_collator(cfg.data, list(model.input_specs.values()))
    train_caps = [SyntheticScenes(2000, image_size=32, seed=cfg.train.seed, modalities=["caption"])[i]["caption"]
                  for i in range(2000)]
    enc = collate.encoder(train_caps)
    cfg.data.val_samples = 256
    batches = eval_batches(BatchSpec.of(model), cfg.data, cfg.mask, cfg.train.seed, batch_size=32)
    res = caption_word_accuracy(model, batches, "caption", classes, enc["ids"], enc["pad"])
    rec = caption_word_recall(model, batches, "caption", classes, enc["ids"], enc["pad"])
    lines = ["# M3AE on synthetic scenes: caption words from the image alone", "",
             f"Command: `{shlex.join(['python', 'benchmarks/m3ae_caption.py', '--config', args.config, '--steps', str(args.steps), *args.overrides])}`  ",
             f"Config: {args.config}, {trainer.step} steps of batch {cfg.train.batch_size} "
             f"({'evaluation of the trained run' if args.eval_only else f'{train_s / 60:.1f} min'} on this machine, torch {torch.__version__}, {torch.get_num_threads()} threads).  ",
             f"Held-out: {cfg.data.val_samples} unseen scenes; caption fully masked, image fully visible; accuracy at the "
             "positions whose true token is a colour / object-type word.", "",
             "| word class | positions | model | most frequent word of the class | most frequent token at the position |",
             "|---|---|---|---|---|"]
    for c, r in res.items():
        lines.append(f"| {c} | {r['positions']} | {r['model']:.3f} | {r['class_frequency_baseline']:.3f} | "
                     f"{r['position_frequency_baseline']:.3f} |")
    lines += ["", "Which colour / object-type words the caption contains (position-free): for a caption with k distinct "
              "words of the class, the model names the k class words it gives the highest probability at any caption "
              "position; the baseline names the k most frequent class words of the training captions.", "",
              "| word class | true words | model recall | frequency-baseline recall |", "|---|---|---|---|"]
    for c, r in rec.items():
        lines.append(f"| {c} | {r['words']} | {r['model']:.3f} | {r['frequency_baseline']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
