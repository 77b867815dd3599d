"""Text adapters and the text path through MultiMAE: TextInput, TextDecoder, SharedDecoder,
padding that never leaks into real outputs, and a text loss over masked non-pad tokens only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multimae.model.decoders import EncodedTokens, SpatialDecoder
from multimae.model.adapters.text import SharedDecoder, TextDecoder, TextInput
from multimae.core.batch import Batch
from multimae.core.masking import MaskPlan, ratio_plan
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.core.modalities import CAPTION, RGB

V, S, P = 50, 32, 8
GRID = (S // P, S // P)
LENGTHS = [5, 2, 0]  # the last sample has no caption: all padding


def _text_support(monkeypatch):
    """Until model.py builds a TextDecoder for text tasks and fills EncodedTokens.pad itself, do it here."""
    build, encode = MultiMAE._build_decoder, MultiMAE.encode

    def build_decoder(self, spec):
        dec = build(self, spec)
        if spec.kind == "text" and not isinstance(dec, TextDecoder):
            c = self.config
            dec = TextDecoder(spec, list(self.input_specs), c.dim, c.decoder_dim, c.decoder_depth, c.decoder_heads,
                              c.mlp_ratio, c.patch_size, c.image_size, c.use_task_queries)
        return dec

    def encode_with_pad(self, batch, plan=None):
        enc = encode(self, batch, plan)
        if enc.pad is None:
            pads = [Batch.of(batch).pad.get(self.input_specs[s.name].key) for s in enc.layout]
            if any(p is not None for p in pads):
                B = enc.masked.shape[0]
                enc.pad = torch.cat([p.bool() if p is not None else torch.zeros(B, s.length, dtype=torch.bool)
                                     for p, s in zip(pads, enc.layout)], dim=1)
        return enc

    monkeypatch.setattr(MultiMAE, "_build_decoder", build_decoder)
    monkeypatch.setattr(MultiMAE, "encode", encode_with_pad)


def make_model(outputs=("rgb",)):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="nano", image_size=S, patch_size=P, inputs=["rgb", "caption"], outputs=list(outputs),
                      modalities={"caption": {"num_classes": V, "max_len": 16}})
    return MultiMAE(cfg).eval()


def text_batch(L: int, seed: int = 0) -> Batch:
    """Captions of LENGTHS real tokens, padded to L (the real ids and the image do not depend on L)."""
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    real = torch.randint(1, V, (B, 8), generator=g)
    ids = torch.zeros(B, L, dtype=torch.int64)
    pad = torch.ones(B, L, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        ids[i, :n], pad[i, :n] = real[i, :n], False
    return Batch({"rgb": torch.randn(B, 3, S, S, generator=g), "caption": ids}, pad={"caption": pad})


def plans(seed: int = 0) -> tuple[MaskPlan, MaskPlan]:
    """The same M3AE masking for L=8 and for L=16 (the extra positions are padding, always hidden)."""
    b = text_batch(8)
    g = torch.Generator().manual_seed(seed)
    p8 = ratio_plan({"rgb": GRID[0] * GRID[1], "caption": 8}, len(LENGTHS), {"rgb": 0.75, "caption": 0.5}, g,
                    valid={"caption": ~b.pad["caption"]})
    extra = torch.ones(len(LENGTHS), 8, dtype=torch.bool)
    # the same plan, budget included: padding adds positions, never encoder slots
    return p8, MaskPlan({"rgb": p8.masks["rgb"], "caption": torch.cat([p8.masks["caption"], extra], 1)},
                        p8.num_visible, p8.uneven)


# --- TextInput ----------------------------------------------------------------------------------------


def test_text_input_shapes_positions_and_errors():
    spec = CAPTION.with_(num_classes=V, max_len=4)
    emb = TextInput(spec, 32)
    ids = torch.randint(0, V, (2, 6))  # longer than max_len: positions extended on the fly
    out = emb(ids)
    assert out.shape == (2, 6, 32)
    assert "pos_emb" not in emb.state_dict() and {n for n, _ in emb.named_parameters()} == {"token_emb.weight", "type_emb"}
    assert torch.allclose(out[:, :4], emb(ids[:, :4]))  # a token's embedding does not depend on the length
    emb.eval()  # the range check runs outside training (in training the data path checks, no host read)
    with pytest.raises(ValueError, match=r"caption: token id 50 out of range \[0, 50\)"):
        emb(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match=r"caption: token id -1 out of range"):
        emb(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="caption: expected integer token ids"):
        emb(torch.rand(1, 3))
    with pytest.raises(ValueError, match=r"expected token ids \(B, L\)"):
        emb(torch.zeros(3, dtype=torch.int64))


# --- padding never leaks --------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_padding_never_leaks_into_encoder_or_rgb(masked):
    model = make_model(("rgb", "norm_rgb"))
    p8, p16 = plans() if masked else (None, None)
    with torch.no_grad():
        a, b = model(text_batch(8), p8), model(text_batch(16), p16)
    assert torch.equal(a.encoded.ids_keep, b.encoded.ids_keep)
    assert a.encoded.tokens.shape == b.encoded.tokens.shape
    assert torch.allclose(a.encoded.tokens, b.encoded.tokens, atol=1e-5)
    for t in ("rgb", "norm_rgb"):
        assert torch.allclose(a.preds[t], b.preds[t], atol=1e-5), t
        assert torch.allclose(a.losses[t], b.losses[t], atol=1e-6), t
    # padded positions are never encoded: the encoder sees exactly the real, unmasked tokens
    real = ~text_batch(8).pad["caption"]
    vis_text = ~a.plan.masks["caption"]
    assert not bool((vis_text & ~real).any())
    if not masked:
        assert torch.equal(vis_text, real)


@pytest.mark.parametrize("masked", [False, True])
def test_padding_never_leaks_into_text_predictions(monkeypatch, masked):
    _text_support(monkeypatch)
    model = make_model(("rgb", "caption"))
    p8, p16 = plans(1) if masked else (None, None)
    with torch.no_grad():
        a, b = model(text_batch(8), p8), model(text_batch(16), p16)
    assert a.preds["caption"].shape == (3, 8, V) and b.preds["caption"].shape == (3, 16, V)
    for i, n in enumerate(LENGTHS):
        assert torch.allclose(a.preds["caption"][i, :n], b.preds["caption"][i, :n], atol=1e-5)
    assert torch.allclose(a.losses["caption"], b.losses["caption"], atol=1e-6)
    assert torch.allclose(a.preds["rgb"], b.preds["rgb"], atol=1e-5)


def test_text_loss_counts_only_masked_non_pad_tokens(monkeypatch):
    _text_support(monkeypatch)
    model = make_model(("rgb", "caption"))
    batch = text_batch(12)
    p8, _ = plans(2)
    plan = MaskPlan({"rgb": p8.masks["rgb"], "caption": torch.cat([p8.masks["caption"], torch.ones(3, 4, dtype=torch.bool)], 1)})
    with torch.no_grad():
        out = model(batch, plan)
    pad = batch.pad["caption"]
    counted = plan.masks["caption"] & ~pad
    assert bool(counted.any()) and bool((plan.masks["caption"] & pad).any())
    ce = F.cross_entropy(out.preds["caption"].transpose(1, 2), batch["caption"], reduction="none")
    has = counted.any(1)
    expected = ((ce * counted).sum(1)[has] / counted.sum(1)[has]).mean()
    assert torch.allclose(out.losses["caption"], expected, atol=1e-6)
    # changing the targets at visible or padded positions does not change the loss; at counted ones it does
    for where, changes in ((~plan.masks["caption"], False), (pad, False), (counted, True)):
        b2 = Batch({**batch.tensors, "caption": torch.where(where, (batch["caption"] + 7) % V, batch["caption"])},
                   pad=batch.pad)
        loss = model.losses(out.preds, b2, out.plan)["caption"]
        assert bool(~torch.isclose(loss, out.losses["caption"])) == changes


# --- decoders ---------------------------------------------------------------------------------------------


def _encoded(L: int, plan=None) -> tuple[MultiMAE, EncodedTokens]:
    model = make_model()
    batch = text_batch(L)
    with torch.no_grad():
        enc = model.encode(batch, plan)
    B = len(LENGTHS)
    enc.pad = torch.cat([torch.zeros(B, GRID[0] * GRID[1], dtype=torch.bool), batch.pad["caption"]], 1)
    return model, enc


def test_text_decoder_shapes_padding_and_parameter_names():
    spec = CAPTION.with_(num_classes=V, max_len=16)
    torch.manual_seed(1)
    dec = TextDecoder(spec, ["rgb", "caption"], 128, dim=64, depth=2, num_heads=4, patch_size=P, image_size=S).eval()
    spatial = SpatialDecoder(RGB, ["rgb", "caption"], 128, 64, 2, 4, 4.0, P, S)
    assert [n for n, _ in dec.named_parameters() if not n.startswith("out_proj")] == \
        [n for n, _ in spatial.named_parameters() if not n.startswith("out_proj")]
    assert dec.out_proj.weight.shape == (V, 64)
    p8, p16 = plans(3)
    _, e8 = _encoded(8, p8)
    _, e16 = _encoded(16, p16)
    with torch.no_grad():
        y8, y16 = dec(e8, GRID), dec(e16, GRID)
        dec.use_task_queries = False
        z8, z16 = dec(e8, GRID), dec(e16, GRID)
    assert y8.shape == (3, 8, V) and y16.shape == (3, 16, V) and torch.isfinite(y16).all()
    for i, n in enumerate(LENGTHS):
        assert torch.allclose(y8[i, :n], y16[i, :n], atol=1e-5) and torch.allclose(z8[i, :n], z16[i, :n], atol=1e-5)


def test_text_decoder_needs_the_text_as_input():
    model = make_model()
    with torch.no_grad():
        enc = model.encode({"rgb": torch.randn(1, 3, S, S)})
    dec = TextDecoder(CAPTION.with_(num_classes=V), ["rgb", "caption"], 128, 64, 1, 4, patch_size=P, image_size=S)
    with pytest.raises(ValueError, match=r"caption: text targets need the text positions.*must be an input"):
        dec(enc, GRID)
    with pytest.raises(ValueError, match="needs a text modality"):
        TextDecoder(RGB, ["rgb"], 128)


def test_shared_decoder_shapes_and_padding():
    specs = [RGB, CAPTION.with_(num_classes=V, max_len=16)]
    torch.manual_seed(2)
    dec = SharedDecoder(specs, 128, dim=64, depth=2, num_heads=4, patch_size=P, image_size=S).eval()
    assert {n for n, _ in dec.named_parameters() if "type_emb" in n} == {"type_emb.rgb", "type_emb.caption"}
    assert {n for n, _ in dec.named_parameters() if "mask_token" in n} == {"mask_tokens.rgb", "mask_tokens.caption"}
    for masked in (False, True):
        p8, p16 = plans(4) if masked else (None, None)
        (_, e8), (_, e16) = _encoded(8, p8), _encoded(16, p16)
        with torch.no_grad():
            y8, y16 = dec(e8, GRID), dec(e16, GRID)
        assert y8["rgb"].shape == (3, 3, S, S) and y8["caption"].shape == (3, 8, V)
        assert y16["caption"].shape == (3, 16, V)
        assert torch.allclose(y8["rgb"], y16["rgb"], atol=1e-5)
        for i, n in enumerate(LENGTHS):
            assert torch.allclose(y8["caption"][i, :n], y16["caption"][i, :n], atol=1e-5)


def test_shared_decoder_image_target_not_input_and_errors():
    model = make_model()
    with torch.no_grad():
        enc = model.encode({"rgb": torch.randn(2, 3, S, S), "caption": torch.randint(0, V, (2, 6))})
    cap = CAPTION.with_(num_classes=V)
    depth = RGB.with_(name="depth", kind="dense", channels=1, source=None, loss="l1", mean=None, std=None)
    dec = SharedDecoder([depth, cap], 128, 64, 1, 4, P, S, context_names=["rgb"])
    out = dec(enc, GRID)  # depth is not an input: mask-token queries on the grid
    assert out["depth"].shape == (2, 1, S, S) and out["caption"].shape == (2, 6, V)
    with pytest.raises(ValueError, match=r"encoded inputs \['rgb'\] have no mask token here; pass them as context_names"):
        SharedDecoder([cap], 128, 64, 1, 4, P, S)(enc, GRID)
    with torch.no_grad():
        img_only = model.encode({"rgb": torch.randn(2, 3, S, S)})
    with pytest.raises(ValueError, match="text targets need the text positions"):
        SharedDecoder([RGB, cap], 128, 64, 1, 4, P, S)(img_only, GRID)
