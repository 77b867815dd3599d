"""``multimae demo``: an interactive browser demo of a trained MultiMAE.

Pick an input (a built-in synthetic scene with its exact depth and segmentation, a folder
dataset sample, or an uploaded image whose other modalities the model predicts from rgb), mask
patches of every input modality by clicking, or draw a random Dirichlet mask for a token budget,
edit the hue of rgb patches or the class of semseg patches, and see every task's prediction
beside its target.

Why Starlette + uvicorn and a static page: the UI is one patch-grid page whose state (which
patches are hidden, what is selected) lives in the browser and changes on every click; it needs
canvases and a handful of JSON calls, nothing a UI framework adds. Starlette and uvicorn are
two packages of under 1 MB each (h11, click and anyio were already installed), where Gradio
would add 20 packages (its client, FastAPI, pandas, pydub, orjson, ... by ``pip install
--dry-run gradio``) and its components still offer no clickable patch grid without custom
JavaScript. The page is plain HTML/JS with no build step. The dependencies are the optional
extra ``multimae[demo]``.

:mod:`.engine` is the model side (no web code), :mod:`.app` the HTTP side.
"""
from multimae.apps.demo.engine import DemoEngine, Limits, engine_from_checkpoint
from multimae.apps.demo.errors import DemoError

__all__ = ["DemoEngine", "DemoError", "Limits", "engine_from_checkpoint"]
