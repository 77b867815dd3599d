"""TransferModel: heads' shapes, inits from this library's runs, fresh modalities, layer decay."""
import pytest
import torch

from multimae.checkpoint import save_checkpoint
from multimae.checkpoint.convert import ConversionError
from multimae.core.config import from_dict, to_dict
from multimae.model.heads import default_hooks, default_layer_dims
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.engine.optim import param_groups
from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig, build_transfer_model
from tiny import TINY

ENC = dict(TINY, depth=3, patch_size=16)


def _enc(**kw) -> ModelConfig:
    return ModelConfig(**{**ENC, **kw})


def _batch(B=2, size=32, with_semseg=False):
    g = torch.Generator().manual_seed(1)
    b = {"rgb": torch.randn(B, 3, size, size, generator=g), "depth": torch.randn(B, 1, size, size, generator=g),
         "label": torch.tensor([0, 1])}
    if with_semseg:
        b["semseg"] = torch.randint(0, 5, (B, size // 4, size // 4), generator=g)
    return b


def _pretrain_run(tmp_path, inputs=("rgb", "depth"), **kw):
    cfg = _enc(inputs=list(inputs), outputs=["rgb", "depth"], decoder_dim=16, decoder_depth=1, decoder_heads=2, **kw)
    mae = MultiMAE(cfg)
    with torch.no_grad():  # no parameter at a trivial init value
        for p in mae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "pre", 7, mae.state_dict(), {"step": 7}, {"config": {"model": to_dict(cfg)}, "epoch": 1})
    return mae, tmp_path / "pre"


@pytest.mark.parametrize("head,shape", [
    (HeadConfig(kind="classification", num_classes=4), (2, 4)),
    (HeadConfig(kind="segmentation", num_classes=6), (2, 6, 48, 48)),
    (HeadConfig(kind="segmentation", num_classes=6, main_tasks=["rgb", "depth"]), (2, 6, 48, 48)),
    (HeadConfig(kind="depth"), (2, 1, 48, 48)),
    (HeadConfig(kind="dense", out_channels=3, main_tasks=["rgb", "depth"]), (2, 3, 48, 48)),
])
def test_heads_shapes_and_gradients(head, shape):
    """48 px = an odd 3x3 token grid (the DPT generalisation); head and encoder both get gradients."""
    model = TransferModel(TransferModelConfig(encoder=_enc(), inputs=["rgb", "depth"], head=head))
    out = model(_batch(size=48))
    assert out.shape == shape
    out.square().mean().backward()
    for prefix in ("head.", "encoder.0.", "input_adapters.depth.proj"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), prefix
    # every gradient has its parameter's layout (DDP's gradient-bucket contract; it warns otherwise)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert not bad, bad


def test_default_dpt_hooks_and_dims():
    assert default_hooks(12) == [2, 5, 8, 11]  # the paper's layers 3, 6, 9, 12
    assert default_hooks(4) == [0, 1, 2, 3]
    assert default_hooks(24) == [5, 11, 17, 23]
    assert default_layer_dims(768) == [96, 192, 384, 768]
    m = TransferModel(TransferModelConfig(encoder=_enc(depth=6), head=HeadConfig(kind="depth")))
    assert m.head.hooks == [1, 2, 4, 5]
    assert m.head.project[0].out_channels == 32  # feature_dim: dim / 3, at least 32
    base = TransferModel(TransferModelConfig(encoder=ModelConfig(preset="base", depth=1), head=HeadConfig(kind="depth")))
    assert base.head.project[0].out_channels == 256  # official ViT-B DPT
    assert [r[0].out_channels for r in base.head.reassemble] == [96, 192, 384, 768]
    seg = TransferModel(TransferModelConfig(encoder=ModelConfig(preset="base", depth=1),
                                            head=HeadConfig(kind="segmentation", num_classes=150)))
    assert seg.head.proj.out_features == 6144 and seg.head.channels == 384  # official ConvNeXt head for ViT-B


def test_encoder_matches_pretraining_model_and_features(tmp_path):
    """The transfer encoder computes MultiMAE.encode with no mask, from exactly the run's weights."""
    mae, run = _pretrain_run(tmp_path)
    cfg = TransferModelConfig(encoder=None, inputs=["rgb", "depth"], head=HeadConfig(kind="classification", num_classes=4),
                              drop_path=0.0)
    model, report = build_transfer_model(cfg, run)
    mae_sd = mae.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            src = k
            assert torch.equal(v, mae_sd[src]), k
    assert report.new_inputs == [] and report.missing == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    assert set(report.dropped) == {k for k in mae_sd if k.startswith("output_adapters.")}
    assert report.source.endswith("step-000000007")
    b = _batch()
    with torch.no_grad():
        ref = mae.eval().encode({k: b[k] for k in ("rgb", "depth")}).tokens  # images only
        enc = model.eval().encode_all(b).last
        torch.testing.assert_close(enc, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.features(b), ref.mean(1))


def test_new_modality_gets_fresh_projection(tmp_path):
    """Fine-tuning with depth on an rgb-only pretraining run (the paper's MAE + depth baseline)."""
    mae, run = _pretrain_run(tmp_path, inputs=("rgb",))
    cfg = TransferModelConfig(encoder=None, inputs=["rgb", "depth"], head=HeadConfig(kind="segmentation", num_classes=3))
    model, report = build_transfer_model(cfg, run)
    assert report.new_inputs == ["depth"]
    assert "input_adapters.depth.proj.weight" in report.missing
    assert "input_adapters.rgb.proj.weight" in report.loaded
    assert torch.equal(model.input_adapters.rgb.proj.weight, mae.input_adapters.rgb.proj.weight)
    assert model(_batch()).shape == (2, 3, 32, 32)
    assert "new input projections: depth" in report.init_summary()


def test_input_adapter_not_used_is_dropped_and_semseg_input(tmp_path):
    mae, run = _pretrain_run(tmp_path, inputs=("rgb", "depth", "semseg"), modalities={"semseg": {"num_classes": 5}})
    cfg = TransferModelConfig(encoder=None, inputs=["rgb", "semseg"], head=HeadConfig(kind="classification", num_classes=4))
    model, report = build_transfer_model(cfg, run)
    assert "input_adapters.depth.proj.weight" in report.dropped
    assert "input_adapters.semseg.class_emb.weight" in report.loaded
    assert model(_batch(with_semseg=True)).shape == (2, 4)


def test_finetune_run_round_trip(tmp_path):
    """A fine-tuning run of this library (transfer layout) restores the whole model exactly."""
    cfg = TransferModelConfig(encoder=_enc(), inputs=["rgb"], head=HeadConfig(kind="depth"))
    model = TransferModel(cfg)
    save_checkpoint(tmp_path / "ft", 3, model.state_dict(), {}, {"config": {"model": to_dict(cfg)}, "epoch": 0})
    again, report = build_transfer_model(from_dict(TransferModelConfig, {**to_dict(cfg), "encoder": None}), tmp_path / "ft")
    assert report.loaded == sorted(model.state_dict()) and report.missing == []
    b = _batch()
    with torch.no_grad():
        assert torch.equal(again.eval()(b), model.eval()(b))


def test_architecture_mismatch_is_named(tmp_path):
    _, run = _pretrain_run(tmp_path)
    cfg = TransferModelConfig(encoder=_enc(num_heads=4), head=HeadConfig(kind="classification", num_classes=2))
    with pytest.raises(ConversionError, match="num_heads: config 4 vs checkpoint 2"):
        build_transfer_model(cfg, run)
    cfg = TransferModelConfig(encoder=_enc(depth=4), head=HeadConfig(kind="classification", num_classes=2))
    with pytest.raises(ConversionError, match="depth: config 4 vs checkpoint 3"):
        build_transfer_model(cfg, run)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_transfer_model(cfg, tmp_path / "does-not-exist")
    with pytest.raises(ConversionError, match=r"unrecognised state dict \(first keys \['fc.weight'\]"):
        build_transfer_model(cfg, {"fc.weight": torch.zeros(2, 2)})


def test_bad_inputs_are_named():
    model = TransferModel(TransferModelConfig(encoder=_enc(), inputs=["rgb", "depth"],
                                              head=HeadConfig(kind="classification", num_classes=2)))
    with pytest.raises(KeyError, match="'depth'"):
        model({"rgb": torch.randn(1, 3, 32, 32)})
    with pytest.raises(ValueError, match="main_tasks"):
        TransferModel(TransferModelConfig(encoder=_enc(), inputs=["depth"], head=HeadConfig(kind="segmentation", num_classes=2)))
    with pytest.raises(ValueError, match="num_classes"):
        TransferModel(TransferModelConfig(encoder=_enc(), head=HeadConfig(kind="classification")))
    # the image-size and layer checks are the model's encoder pass (multimae.model.multimae.run_encoder)
    with pytest.raises(ValueError, match=r"different image sizes \(rgb: 32x32, depth: 48x48\)"):
        model({"rgb": torch.randn(1, 3, 32, 32), "depth": torch.randn(1, 1, 48, 48)})
    with pytest.raises(ValueError, match=r"layer\(s\) \[3\] outside 0..2"):
        model.encode_all(_batch(), return_layers=[1, 3])


@pytest.mark.parametrize("kind", ["segmentation", "depth"])
def test_layer_ids_for_layer_decay(kind):
    """Embeddings -> 0, block i -> i+1, every head parameter -> depth+1 (the ConvNeXt head's
    blocks must not be taken for encoder blocks); the default vit_layer_id agrees."""
    model = TransferModel(TransferModelConfig(encoder=_enc(), inputs=["rgb", "depth"],
                                              head=HeadConfig(kind=kind, num_classes=3)))
    L = model.num_layers
    assert L == 3
    for name, _ in model.named_parameters():
        lid = model.layer_id(name)
        if name.startswith("encoder."):
            assert lid == int(name.split(".")[1]) + 1, name
        elif name.startswith(("input_adapters.", "global_tokens")):
            assert lid == 0, name
        else:
            assert name.startswith("head.") and lid == L + 1, name
        assert model.layer_id("module." + name) == lid
    for fn in (model.encoder_layer_ids(), None):
        groups = param_groups(model, 0.05, layer_decay=0.75, layer_id_fn=fn, num_layers=L)
        scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
        first = scale["encoder.0.attn.qkv.weight"]
        last = scale[f"encoder.{L - 1}.attn.qkv.weight"]
        assert last / first == pytest.approx(0.75 ** -(L - 1))
        assert scale["input_adapters.rgb.proj.weight"] == pytest.approx(0.75 ** (L + 1))
        assert all(v == 1.0 for n, v in scale.items() if n.startswith("head."))


def test_classification_pooling_mean_or_global():
    torch.manual_seed(0)
    cfg = TransferModelConfig(encoder=_enc(), inputs=["rgb"], head=HeadConfig(kind="classification", num_classes=3))
    model = TransferModel(cfg).eval()
    glob = TransferModel(TransferModelConfig(encoder=_enc(), inputs=["rgb"],
                                             head=HeadConfig(kind="classification", num_classes=3, use_global=True))).eval()
    glob.load_state_dict(model.state_dict())
    b = _batch()
    with torch.no_grad():
        last = model.encode_all(b).last  # 4 rgb tokens then the global token
        assert last.shape == (2, 5, 32)
        h = model.head
        torch.testing.assert_close(model(b), h.fc(h.norm(last.mean(1))))
        torch.testing.assert_close(glob(b), h.fc(h.norm(last[:, -1])))


def test_text_inputs_are_refused():
    with pytest.raises(ValueError, match="caption"):
        TransferModel(TransferModelConfig(encoder=_enc(), inputs=["rgb", "caption"],
                                          head=HeadConfig(kind="classification", num_classes=2)))


def test_finetune_run_to_another_task_keeps_encoder_fresh_head(tmp_path):
    cfg = TransferModelConfig(encoder=_enc(), inputs=["rgb"], head=HeadConfig(kind="classification", num_classes=4))
    model = TransferModel(cfg)
    save_checkpoint(tmp_path / "ft", 3, model.state_dict(), {}, {"config": {"model": to_dict(cfg)}, "epoch": 0})
    other = TransferModelConfig(encoder=None, inputs=["rgb", "depth"], head=HeadConfig(kind="classification", num_classes=3))
    again, report = build_transfer_model(other, tmp_path / "ft")
    assert sorted(report.dropped) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    assert report.new_inputs == ["depth"]
    assert all(k.startswith(("head.", "input_adapters.depth.")) for k in report.missing)
    assert torch.equal(again.encoder[2].mlp.fc2.weight, model.encoder[2].mlp.fc2.weight)


def test_save_pretrained_dir_and_timm_vit_inits(tmp_path):
    """A save_pretrained directory and a timm ViT state dict (which carries a final norm) both
    give the encoder the library's own loader gives (MultiMAE.from_pretrained)."""
    from multimae.checkpoint.pretrained import save_pretrained
    from multimae.checkpoint.vit import to_timm_state_dict

    mae, _ = _pretrain_run(tmp_path, inputs=("rgb",))
    head = HeadConfig(kind="classification", num_classes=2)
    b = {"rgb": _batch()["rgb"]}
    save_pretrained(mae, tmp_path / "hf")
    model, report = build_transfer_model(TransferModelConfig(encoder=None, inputs=["rgb"], head=head, drop_path=0.0),
                                         tmp_path / "hf")
    assert report.source == str(tmp_path / "hf") and report.new_inputs == []
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_all(b).last, mae.eval().encode(b).tokens, rtol=0, atol=1e-6)
    timm_sd, _, _ = to_timm_state_dict(mae)
    model, report = build_transfer_model(TransferModelConfig(encoder=None, inputs=["rgb"], head=head, drop_path=0.0),
                                         {"module." + k: v for k, v in timm_sd.items()},  # a DDP-wrapped save
                                         num_heads=mae.config.num_heads)
    ref, _ = MultiMAE.from_pretrained(timm_sd, with_report=True, outputs=[], num_heads=mae.config.num_heads)
    assert isinstance(model.encoder_norm, torch.nn.LayerNorm) and "encoder_norm.weight" in report.loaded
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_all(b).last, ref.encode(b).tokens, rtol=0, atol=1e-5)


def test_drop_path_schedule():
    model = TransferModel(TransferModelConfig(encoder=_enc(), head=HeadConfig(kind="classification", num_classes=2),
                                              drop_path=0.1))
    probs = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.encoder]
    assert probs == pytest.approx([0.0, 0.05, 0.1])


def test_dpt_runs_only_up_to_its_last_hook():
    model = TransferModel(TransferModelConfig(encoder=_enc(), head=HeadConfig(kind="depth", hooks=[0, 0, 1, 1]),
                                              drop_path=0.0)).eval()
    calls = []
    for i, blk in enumerate(model.encoder):
        blk.register_forward_hook(lambda *a, i=i: calls.append(i))
    b = _batch()
    with torch.no_grad():
        out = model(b)
        enc = model.encode_all(b, return_layers=[0, 1], final=False)
    assert calls == [0, 1, 0, 1] and out.shape == (2, 1, 32, 32)
    assert torch.equal(enc.last, enc.layers[1])
