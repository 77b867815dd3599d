"""Caption word scores from the image alone: the frequency baselines come from the training captions;
a word class that no training caption holds still gets a baseline (its first word)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from multimae.core.masking import MaskPlan
from multimae.evaluation.text_eval import caption_word_accuracy, caption_word_recall

VOCAB = 10


class Oracle(nn.Module):
    """Answers every caption position with its true token (the model side of the scores)."""

    def forward(self, batch, plan, tasks, compute_loss):
        tokens = batch[tasks[0]]
        return SimpleNamespace(preds={tasks[0]: torch.nn.functional.one_hot(tokens, VOCAB).float()})


def test_word_class_absent_from_training_captions_gets_its_first_word_as_baseline() -> None:
    train = torch.tensor([[1, 2, 2, 5], [1, 2, 3, 5]])  # colours {2, 3}: 2 the most frequent; shapes {7, 8}: unseen
    pad = torch.zeros_like(train, dtype=torch.bool)
    test = torch.tensor([[1, 3, 8, 5], [1, 2, 7, 5]])
    batches = [({"caption": test}, MaskPlan({"caption": torch.zeros(2, 4, dtype=torch.bool)}))]
    classes = {"colour": [3, 2], "shape": [8, 7]}
    acc = caption_word_accuracy(Oracle(), batches, "caption", classes, train, pad)
    assert acc["colour"]["model"] == 1.0 and acc["colour"]["positions"] == 2
    assert acc["colour"]["class_frequency_baseline"] == 0.5  # always "2": right on one of the two colour positions
    assert acc["shape"]["class_frequency_baseline"] == 0.5  # unseen class: always its first word, 8
    assert acc["shape"]["position_frequency_baseline"] == 0.0  # position 2 holds 2 or 3 in training
    rec = caption_word_recall(Oracle(), batches, "caption", classes, train, pad)
    assert rec["colour"]["model"] == 1.0 and rec["colour"]["frequency_baseline"] == 0.5
    assert rec["shape"]["frequency_baseline"] == 0.5
