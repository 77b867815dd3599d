"""ONNX export of transfer models (fine-tuned heads) and of encoders.

``export_onnx(source, out)`` writes one ONNX file and returns an :class:`ExportInfo`:

* a fine-tuning run (classification, segmentation, depth or any dense head): inputs are the
  run's input modalities, one ONNX input each (``rgb`` (B,3,H,W), ``depth`` (B,1,H,W), ...), the
  output is the head's (``logits`` (B,K) / ``logits`` (B,K,H,W) / ``depth`` (B,1,H,W) / the dense
  target's name);
* a linear-probe run: the frozen encoder's mean token -> the probe (``logits`` (B,K));
* with ``encoder_only=True``, or any pretraining run / weights that
  :func:`multimae.model.transfer.read_init` reads (a pretraining run, ``save_pretrained``
  directory, official / MAE / timm weights): the encoder over every token of ``inputs``,
  output ``tokens`` (B, N + global tokens, D) -- the features a head reads.

Inputs are what the model is fed inside this library, i.e. after the evaluation transform: rgb
normalised with the ImageNet mean and std (recorded in the file's metadata), depth
robust-standardised per image. The batch axis is dynamic; the image size is fixed to the run's
(``image_size`` in the metadata). The export uses ``torch.onnx.export(dynamo=True)`` (onnxscript)
at opset 18, and, when onnxruntime is installed, runs the file once at a batch size other than the
traced one and reports the largest difference from PyTorch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from multimae.checkpoint import CheckpointError

DEFAULT_OPSET = 18
TRACE_BATCH = 2


@dataclass
class ExportInfo:
    """What was written: the file, its input / output names and shapes, metadata, the check."""

    path: Path
    kind: str
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    metadata: dict[str, str] = field(default_factory=dict)
    max_abs_diff: float | None = None  # onnxruntime vs PyTorch at batch size ``checked_batch``
    checked_batch: int | None = None

    def summary(self) -> str:
        def shapes(d: dict[str, list[int | str]]) -> str:
            return ", ".join(f"{k} ({', '.join(map(str, v))})" for k, v in d.items())

        line = f"wrote {self.path} ({self.kind}): inputs {shapes(self.inputs)} -> {shapes(self.outputs)}"
        if self.max_abs_diff is not None:
            line += f"; onnxruntime vs PyTorch at batch {self.checked_batch}: max |diff| {self.max_abs_diff:.2e}"
        return line


class _Positional(nn.Module):
    """A model that takes a modality dict, called with one positional tensor per modality."""

    def __init__(self, model: nn.Module, keys: Sequence[str], encoder_only: bool) -> None:
        super().__init__()
        self.model, self.keys, self.encoder_only = model, list(keys), encoder_only

    def forward(self, *xs: Tensor) -> Tensor:
        out = self.model(dict(zip(self.keys, xs)))
        return out.last if self.encoder_only else out


def load_exportable(source: str | os.PathLike, inputs: Sequence[str] | None = None,
                    encoder_only: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The module to export from ``source`` and its description (kind, input specs, image size,
    output name, class names). See the module doc for the sources."""
    from multimae.checkpoint import load_meta, resolve_checkpoint
    from multimae.runs import load_run

    p = Path(source)
    if not p.exists():
        raise CheckpointError(f"export: checkpoint {p} does not exist")
    kind = None
    if p.is_dir():
        try:
            kind = load_meta(resolve_checkpoint(p)).get("kind")
        except CheckpointError:
            kind = None  # e.g. a save_pretrained directory: read by build_transfer_model below
    if kind in ("finetune", "probe"):
        run = load_run(p)
        names = [s.name for s in run.inputs]
        if inputs and list(inputs) != names:
            raise CheckpointError(f"export: {run.checkpoint} was fine-tuned on inputs {names}; "
                                  f"--inputs {list(inputs)} would need another head")
        (target, out), = run.outputs.items()
        model: nn.Module = run.model
        enc = run.model  # the transfer model is its encoder + a head
        if encoder_only:
            desc = {"kind": "encoder", "output": "tokens"}
            model = run.model.encoder_only().eval()  # type: ignore[union-attr]
        elif run.kind == "probe":
            desc = {"kind": "probe", "output": "logits"}
        else:
            desc = {"kind": out.kind, "output": "logits" if out.kind in ("classification", "segmentation") else target}
        desc.update(specs=list(run.inputs), image_size=int(enc.encoder_config.image_size), patch_size=int(enc.patch_size),
                    source=str(run.checkpoint), num_classes=out.num_classes,
                    classes=out.classes if out.classes and not encoder_only else None)
        return model, desc
    from multimae.model.transfer import HeadConfig, TransferModelConfig, build_transfer_model, read_init

    weights = read_init(source)  # read once: weights in MultiMAE names + the architecture
    enc_inputs = list(inputs) if inputs else default_inputs(None if weights.inferred else weights.config)
    cfg = TransferModelConfig(encoder=weights.config, inputs=enc_inputs,
                              head=HeadConfig(kind="classification", num_classes=1), drop_path=0.0)
    model, _ = build_transfer_model(cfg, init=weights)
    enc = model.encoder_only()
    desc = {"kind": "encoder", "output": "tokens", "specs": list(enc.input_specs.values()),
            "image_size": int(enc.encoder_config.image_size), "patch_size": int(enc.patch_size), "source": str(source),
            "num_classes": None, "classes": None}
    return enc.eval(), desc


def default_inputs(recorded: Any) -> list[str]:
    """An encoder export's inputs when none are asked for: the run's image-like inputs (rgb,
    depth, ...), i.e. without per-pixel class ids (semseg) or text, which a deployed model
    rarely has; ``rgb`` for weights that record no architecture."""
    from multimae.core.modalities import get

    names = list(recorded.inputs) if recorded is not None else ["rgb"]
    overrides = getattr(recorded, "modalities", None) or {}

    def kind(n: str) -> str:
        try:
            return get(n).kind
        except (KeyError, ValueError):
            return str(overrides.get(n, {}).get("kind", "image"))
    chosen = [n for n in names if kind(n) in ("image", "dense")]
    return chosen or names


def _example(specs: Sequence[Any], size: int, batch: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Example inputs of each spec's shape and dtype: float (B,C,h,w); class ids int64 (B,h,w)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for sp in specs:
        h = size // sp.stride
        if sp.kind == "categorical":
            out.append(torch.randint(0, sp.num_classes, (batch, h, h), generator=g))
        else:
            out.append(torch.randn(batch, sp.channels, h, h, generator=g))
    return tuple(out)


def export_onnx(source: str | os.PathLike | nn.Module, out: str | os.PathLike, inputs: Sequence[str] | None = None,
                encoder_only: bool = False, opset: int = DEFAULT_OPSET, check: bool = True) -> ExportInfo:
    """Export ``source`` (a run / checkpoint / weights path, see the module doc) to ``out``
    (written atomically). ``check``: run the file with onnxruntime (if installed) at batch 3 and
    record the largest absolute difference from PyTorch."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the export extra installs it
        raise CheckpointError("ONNX export needs onnx and onnxscript: pip install -e '.[export]'") from e
    from multimae.model.layers.attention import set_attention

    module, desc = load_exportable(source, inputs, encoder_only)
    set_attention(module, "manual")  # plain matmul + softmax: exports to any runtime, same numbers
    specs = desc["specs"]
    spatial = [sp for sp in specs if sp.is_spatial]
    if len(spatial) != len(specs):
        raise CheckpointError(f"export: only image-like inputs can be exported, got {[s.name for s in specs]}")
    keys = [sp.key for sp in specs]
    wrapped = _Positional(module, keys, encoder_only=desc["kind"] == "encoder").eval()
    size = desc["image_size"]
    example = _example(specs, size, TRACE_BATCH)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = desc["output"]
    if name in keys:  # a depth head over a depth input: ONNX names must differ (else the input is renamed)
        name = f"{name}_pred"
    with torch.no_grad():
        program = torch.onnx.export(wrapped, example, input_names=keys, output_names=[name],
                                    dynamic_shapes=(tuple({0: batch_dim} for _ in keys),), opset_version=opset,
                                    dynamo=True, verbose=False)
    proto = program.model_proto
    mean = {sp.key: list(sp.mean) for sp in specs if sp.mean is not None}
    std = {sp.key: list(sp.std) for sp in specs if sp.std is not None}
    metadata = {"multimae.kind": desc["kind"], "multimae.source": desc["source"],
                "multimae.inputs": json.dumps(keys), "multimae.image_size": str(size),
                "multimae.patch_size": str(desc["patch_size"]), "multimae.input_mean": json.dumps(mean),
                "multimae.input_std": json.dumps(std), "multimae.output": name,
                # the input specs' reading fields (a raster's bands / nodata), so a consumer reads as training did
                "multimae.input_specs": json.dumps({sp.key: {"kind": sp.kind, "channels": sp.channels,
                                                            "bands": list(sp.bands), "band_names": list(sp.band_names),
                                                            "nodata": sp.nodata} for sp in specs})}
    if desc.get("num_classes"):
        metadata["multimae.num_classes"] = str(desc["num_classes"])
    if desc.get("classes"):
        metadata["multimae.classes"] = json.dumps(desc["classes"])
    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    from multimae.core.io import save_file_atomic  # fsync + rename, the user's umask

    save_file_atomic(out, lambda tmp: onnx.save_model(proto, str(tmp)))
    with torch.no_grad():
        ref = wrapped(*example)
    dims = lambda shape: ["batch", *shape[1:]]  # noqa: E731
    info = ExportInfo(out, desc["kind"], {k: dims(list(x.shape)) for k, x in zip(keys, example)},
                      {name: dims(list(ref.shape))}, metadata)
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return info
        x3 = _example(specs, size, 3, seed=1)
        with torch.no_grad():
            want = wrapped(*x3)
        got = run_onnx(out, dict(zip(keys, x3)))
        info.max_abs_diff = float((torch.from_numpy(got) - want).abs().max())
        info.checked_batch = 3
    return info


def run_onnx(path: str | os.PathLike, feeds: dict[str, Tensor]) -> Any:
    """Run an exported file with onnxruntime on the CPU: modality tensors -> the output (numpy)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
