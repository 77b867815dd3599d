"""Caption prediction from the image alone (M3AE): the caption fully masked, the image fully
visible; accuracy on the positions whose true word falls in given word classes (e.g. colours,
object types), against frequency baselines."""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from multimae.core.batch import Batch
from multimae.core.masking import MaskPlan
from multimae.model.multimae import MultiMAE


@torch.no_grad()
def caption_word_accuracy(model: MultiMAE, batches: Iterable[tuple[dict[str, Any], MaskPlan]], text: str,
                          word_classes: Mapping[str, Sequence[int]], train_tokens: Tensor, train_pad: Tensor
                          ) -> dict[str, dict[str, float]]:
    """Per word class: model accuracy, the accuracy of always answering the class's most frequent
    training word, and of answering the most frequent training token at that position.

    word_classes: class name -> token ids of its words. train_tokens/train_pad: (N, L) captions of
    the training data, for the baselines.
    """
    model.eval()
    ids = {c: torch.tensor(list(v)) for c, v in word_classes.items()}
    real_tr = ~train_pad
    pos_mode = torch.tensor([Counter(train_tokens[real_tr[:, j], j].tolist()).most_common(1)[0][0]
                             if real_tr[:, j].any() else -1 for j in range(train_tokens.shape[1])])
    seen = Counter(train_tokens[real_tr].tolist())  # a class no training caption holds answers its first word
    freq_word = {c: max(v.tolist(), key=seen.__getitem__) for c, v in ids.items()}
    hits = {c: [0, 0, 0, 0] for c in ids}  # model, class-frequency, position-mode, count
    for batch, plan in batches:
        batch, logits = _caption_logits(model, batch, plan, text)
        pred, tgt = logits.argmax(-1), batch[text]
        real = ~batch.absent(text, tgt.shape[1])
        L = tgt.shape[1]
        for c, v in ids.items():
            sel = torch.isin(tgt, v) & real
            hits[c][0] += int((pred == tgt)[sel].sum())
            hits[c][1] += int((tgt == freq_word[c])[sel].sum())
            hits[c][2] += int((tgt == pos_mode[:L][None].expand_as(tgt))[sel].sum())
            hits[c][3] += int(sel.sum())
    return {c: {"model": h[0] / max(1, h[3]), "class_frequency_baseline": h[1] / max(1, h[3]),
                "position_frequency_baseline": h[2] / max(1, h[3]), "positions": h[3]} for c, h in hits.items()}


@torch.no_grad()
def caption_word_recall(model: MultiMAE, batches: Iterable[tuple[dict[str, Any], MaskPlan]], text: str,
                        word_classes: Mapping[str, Sequence[int]], train_tokens: Tensor, train_pad: Tensor
                        ) -> dict[str, dict[str, float]]:
    """Which words of a class does a caption contain, read from the image alone (caption fully
    masked)? Per caption with k distinct true words of the class, the model names the k class
    words with the highest probability at any caption position; the baseline names the k most
    frequent class words of the training captions. Returns recall (hits / true words) of both."""
    model.eval()
    real_tr = ~train_pad
    tallies = {c: [0, 0, 0] for c in word_classes}  # model hits, baseline hits, true words
    # class words by training frequency (ties and unseen words in class order): the baseline names the first k
    seen = Counter(train_tokens[real_tr].tolist())
    ranked = {c: sorted(dict.fromkeys(v), key=lambda w: -seen[w]) for c, v in word_classes.items()}
    for batch, plan in batches:
        batch, logits = _caption_logits(model, batch, plan, text)
        real = ~batch.absent(text, batch[text].shape[1])
        prob = logits.float().softmax(-1).masked_fill(~real[..., None], 0).amax(1)  # (B, V): best position per word
        for c, v in word_classes.items():
            ids = torch.tensor(list(v))
            for b in range(prob.shape[0]):
                true = set(batch[text][b][real[b]].tolist()) & set(v)
                k = len(true)
                if not k:
                    continue
                top = ids[prob[b, ids].topk(k).indices].tolist()
                base = ranked[c][:k]
                tallies[c][0] += len(true & set(top))
                tallies[c][1] += len(true & set(base))
                tallies[c][2] += k
    return {c: {"model": m / max(1, n), "frequency_baseline": b / max(1, n), "words": n}
            for c, (m, b, n) in tallies.items()}


def _caption_logits(model: MultiMAE, batch: Batch | dict[str, Any], plan: MaskPlan, text: str) -> tuple[Batch, Tensor]:
    """The batch and the model's caption logits from the image alone (the caption fully masked)."""
    hide = {n: torch.ones_like(m) if n == text else torch.zeros_like(m) for n, m in plan.masks.items()}
    return Batch.of(batch), model(batch, MaskPlan(hide), tasks=[text], compute_loss=False).preds[text]
