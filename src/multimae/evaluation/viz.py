"""Figures: per modality, the masked input, the prediction and the target (paper Figs. 1, 3, 4).

Two panels per sample: random masks (the run's masking) and cross-modal prediction from the
first input modality alone. Returns uint8 images (3, H, W); :func:`save_png` writes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from multimae.core.batch import Batch
from multimae.model.losses import patchify, unpatchify
from multimae.core.masking import MaskPlan
from multimae.model.multimae import MultiMAE
from multimae.core.modalities import ModalitySpec

# 6-stop approximation of the viridis colour map
_VIRIDIS = np.array([[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132], [122, 209, 81], [253, 231, 37]],
                    dtype=np.float32) / 255.0


def colormap(x: Tensor) -> Tensor:
    """(H, W) values in [0, 1] -> (3, H, W) viridis colours."""
    v = x.clamp(0, 1).numpy() * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    f = (v - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - f) + _VIRIDIS[lo + 1] * f
    return torch.from_numpy(rgb).permute(2, 0, 1)


def palette(n: int) -> Tensor:
    """n distinct colours (n, 3) in [0, 1], fixed."""
    g = torch.Generator().manual_seed(3)
    pal = torch.rand(n, 3, generator=g) * 0.8 + 0.2
    pal[0] = torch.tensor([0.35, 0.35, 0.35])
    return pal


def render(spec: ModalitySpec, x: Tensor, ref: Tensor | None = None, size: int | None = None) -> Tensor:
    """One modality of one sample -> (3, S, S) float in [0, 1]. ``ref`` sets the value range of
    dense maps (the target's) so that prediction and target share a colour scale."""
    if spec.kind == "categorical":
        ids = x.argmax(0) if x.ndim == 3 else x
        img = palette(spec.num_classes)[ids.long()].permute(2, 0, 1)
    elif spec.kind == "image":
        img = x.float()
        if spec.normalized and not spec.norm_pix:
            img = spec.denormalize(img)
        elif spec.norm_pix:
            img = (img - img.min()) / (img.max() - img.min() + 1e-6)
        img = img[:3].clamp(0, 1)
    elif x.shape[0] != 3:  # depth-like; of other channel counts (not a colour), the first channel
        r = (ref if ref is not None else x)[0].float()
        lo, hi = torch.quantile(r.flatten(), 0.02), torch.quantile(r.flatten(), 0.98)
        img = colormap(((x[0].float() - lo) / (hi - lo + 1e-6)))
    else:
        img = ((x[:3].float() + 1) / 2).clamp(0, 1)
    if size is not None and img.shape[-1] != size:
        img = torch.nn.functional.interpolate(img[None], size=(size, size), mode="nearest")[0]
    return img


def gray_out(img: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Grey the hidden patches of a rendered (3, S, S) image; mask: (N,) True = hidden."""
    m = mask.reshape(1, 1, *grid).float()
    m = torch.nn.functional.interpolate(m, size=img.shape[-2:], mode="nearest")[0]
    return img * (1 - m) + 0.5 * m


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    im = Image.fromarray(tile)
    ImageDraw.Draw(im).text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(im)


def words(tokens: Sequence[str]) -> str:
    """WordPiece tokens -> text (``##`` pieces joined to the previous token)."""
    out = ""
    for t in tokens:
        out += t[2:] if t.startswith("##") else (" " + t if out else t)
    return out


def text_tile(lines: Sequence[str], width: int, height: int) -> np.ndarray:
    """Wrapped text on a dark tile (height, width, 3) uint8."""
    im = Image.new("RGB", (width, height), (25, 25, 25))
    d = ImageDraw.Draw(im)
    y, per_line = 14, max(8, width // 6)
    for line in lines:
        for k in range(0, max(1, len(line)), per_line):
            d.text((3, y), line[k:k + per_line], fill=(235, 235, 235))
            y += 11
        y += 4
    return np.asarray(im)


def _text_tiles(name: str, pred: Tensor, target: Tensor, hidden: Tensor, pad: Tensor, vocab: Sequence[str],
                size: int) -> list[np.ndarray]:
    real = ~pad
    true = [vocab[int(t)] for t, r in zip(target, real) if r]
    shown = [vocab[int(t)] if not h else "_" for t, h, r in zip(target, hidden, real) if r]
    guess = [vocab[int(t)] for t, r in zip(pred.argmax(-1), real) if r]
    return [_label(text_tile([f"masked: {words(shown)}", f"predicted: {words(guess)}", f"true: {words(true)}"],
                             3 * size + 8, int(size * 1.6)), f"{name}: masked / predicted / true")]


def panel(model: MultiMAE, batch: Batch | dict[str, Any], plan: MaskPlan | None, i: int, size: int, title: str,
          encode: Sequence[str] | None = None, vocab: Sequence[str] | None = None) -> np.ndarray:
    """One row: for every output task, [masked input | prediction | target] of sample i.
    ``encode``: batch keys given to the model (default all); targets always come from ``batch``."""
    batch = Batch.of(batch)
    inputs = batch if encode is None else batch.select(list(encode))
    with torch.no_grad():
        out = model(inputs, plan, compute_loss=False)
    p = model.config.patch_size
    tiles = []
    for t, spec in model.output_specs.items():
        tgt = batch.get(spec.key)
        pred = out.preds[t][i].float().cpu()
        src = next((s for s in out.encoded.layout if s.name == spec.key), None)
        if spec.kind == "text":
            if tgt is not None and src is not None and vocab is not None:
                tiles += _text_tiles(t, pred, tgt[i].cpu(), out.encoded.masked[i, src.start:src.end].cpu(),
                                     batch.absent(spec.key, tgt.shape[1])[i].cpu(), vocab, size)
            continue
        if spec.norm_pix and tgt is not None:  # show in pixel space with the target's patch statistics
            tp = patchify(tgt[i:i + 1].float().cpu(), p)
            mu, sd = tp.mean(-1, keepdim=True), (tp.var(-1, keepdim=True) + 1e-6).sqrt()
            pred = unpatchify(patchify(pred[None], p) * sd + mu, p, (tgt.shape[-2] // p, tgt.shape[-1] // p), tgt.shape[1])[0]
        if src is not None and tgt is not None:
            inp = gray_out(render(spec, tgt[i].cpu(), size=size), out.encoded.masked[i, src.start:src.end].cpu(), src.grid)
        else:
            inp = torch.full((3, size, size), 0.15)
        ref = tgt[i].cpu() if tgt is not None else None
        tgt_img = render(spec, tgt[i].cpu(), size=size) if tgt is not None else torch.full((3, size, size), 0.15)
        in_name = f"{t} in" if src is not None else f"{t}: not encoded"  # output-only, or not given
        for img, name in ((inp, in_name), (render(spec, pred, ref, size), f"{t} pred"), (tgt_img, f"{t} target")):
            tiles.append(_label((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8), name))
    h = max(x.shape[0] for x in tiles)
    row = np.concatenate([np.pad(x, ((2, 2 + h - x.shape[0]), (2, 2), (0, 0))) for x in tiles], axis=1)
    head = np.zeros((14, row.shape[1], 3), np.uint8)
    return np.concatenate([_label(head, title), row], axis=0)


def reconstruction_grid(model: MultiMAE, batch: Batch | dict[str, Any], plan: MaskPlan, num_samples: int = 2,
                        size: int = 96, vocab: Sequence[str] | None = None) -> Tensor:
    """Figure for the first ``num_samples`` of a batch: random-mask and cross-modal panels.
    Returns uint8 (3, H, W)."""
    source = next(iter(model.input_specs.values()))
    rows = []
    for i in range(min(num_samples, plan.masks[next(iter(plan.masks))].shape[0])):
        one = Batch.of(batch).rows(slice(i, i + 1))
        one_plan = MaskPlan({k: m[i:i + 1] for k, m in plan.masks.items()})
        rows.append(panel(model, one, one_plan, 0, size, f"sample {i}: random masks", vocab=vocab))
        # cross-modal: the other inputs present but fully hidden (text decoders need their positions)
        hide = MaskPlan({n: torch.ones_like(m) if n != source.name else torch.zeros_like(m)
                         for n, m in one_plan.masks.items()})
        rows.append(panel(model, one, hide, 0, size, f"sample {i}: from {source.name} only", vocab=vocab))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return torch.from_numpy(np.concatenate(rows, axis=0)).permute(2, 0, 1).contiguous()


def save_png(image: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


def reconstruction_figure(model: MultiMAE, cfg: Any, num_samples: int = 2) -> Tensor | None:
    """The figure on held-out samples of a run's data config (used by the trainer); None when the
    data has no held-out samples (a folder dataset without a validation split)."""
    was_training = model.training
    model.eval()
    fig = heldout_figure(model, cfg.data, cfg.mask, cfg.train.seed, num_samples)
    model.train(was_training)
    return fig


def heldout_figure(model: MultiMAE, data: Any, mask: Any, seed: int, num_samples: int = 2) -> Tensor | None:
    """The figure of the first ``num_samples`` held-out samples of ``data`` (a
    :class:`~multimae.data.config.DataConfig`) under ``mask`` (its masking, seeded); None when
    there are none."""
    from multimae.data.loader import BatchSpec, eval_batches

    batches = eval_batches(BatchSpec.of(model), data, mask, seed, batch_size=num_samples, limit=num_samples)
    if not batches:
        return None
    batch, plan = batches[0]
    return reconstruction_grid(model, batch, plan, num_samples, vocab=run_vocabulary(model, data))


def files_figure(model: MultiMAE, mask: Any, files: Sequence[str | Path], seed: int = 0) -> Tensor:
    """RGB image files -> figure (random masks of the first input under ``mask``, and every other
    task predicted from it)."""
    from multimae.core.seeding import generator
    from multimae.data.codecs import decode_image
    from multimae.data.errors import DataError
    from multimae.data.loader import BatchSpec, MaskCollator
    from multimae.data.transforms import PairedTransform

    source = next(iter(model.input_specs.values()))
    tf = PairedTransform([source], model.config.image_size, train=False)
    samples = []
    for f in files:
        try:
            data = Path(f).read_bytes()
        except OSError as e:
            raise DataError(f"image {f}: cannot be read ({e})") from e
        arr = decode_image(data, 3, f"image {f}")  # upright (EXIF), alpha composited
        samples.append(tf({source.key: arr, "__key__": Path(f).stem}))
    batch = Batch({source.key: torch.stack([s[source.key] for s in samples])})
    spec = BatchSpec((source,), (source,), model.config.patch_size, model.config.image_size)
    plan = MaskCollator(spec, mask, seed).plan(batch, generator(seed, "visualize-files"))
    return reconstruction_grid(model, batch, plan, len(files))


def run_vocabulary(model: MultiMAE, data: Any) -> list[str] | None:
    """id -> token of the tokenizer of ``data`` (a run's data config), when the model has a text modality."""
    if not any(s.kind == "text" for s in model.input_specs.values()):
        return None
    from multimae.data.loader import load_text_tokenizer

    tok = load_text_tokenizer(data.tokenizer)
    return [tok.id_to_token(i) or "?" for i in range(tok.get_vocab_size())]
