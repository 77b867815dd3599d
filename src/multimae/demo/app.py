"""The demo's web side: a Starlette (ASGI) app served by uvicorn, and one static page.

Endpoints (JSON in and out; errors are ``{"error": message}`` with a 4xx status):

* ``GET /``: the page; ``GET /static/...``: its script and style.
* ``GET /api/info``: the model's modalities, patch grid, default budget and alpha, sources.
* ``POST /api/sample`` ``{"source": "synthetic"|"folder", "index": i}``: a new input sample.
* ``POST /api/upload`` (body: the image file's bytes): a sample from an uploaded image.
* ``POST /api/mask`` ``{"sample", "budget", "alpha", "seed"}``: a random Dirichlet mask.
* ``POST /api/predict`` ``{"sample", "hidden": {modality: [patch indices]}}``: predictions.
* ``POST /api/edit`` ``{"sample", "modality", "patches", "hue" | "class"}``: an edited sample.

Model calls run in the thread pool behind one lock (:class:`~multimae.demo.engine.DemoEngine`),
so concurrent requests queue instead of racing. Nothing is written to disk: uploads are decoded
in memory and samples live in a bounded in-memory store.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from multimae.demo.engine import DemoEngine
from multimae.demo.errors import DemoError

STATIC = Path(__file__).parent / "static"
MAX_JSON_BYTES = 1 << 20
DRAIN_LIMIT = 64 << 20  # bodies over the limit but under this are read to the end before the 413
log = logging.getLogger("multimae.demo")


async def _body(request: Request, limit: int) -> bytes:
    """The request body; 413 past ``limit`` bytes. A body up to ``DRAIN_LIMIT`` is read to its
    end first (and dropped), so that the client, still sending, gets the 413 rather than a reset
    connection; a larger one is refused at once."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max(limit, DRAIN_LIMIT):
        raise DemoError(f"request body of {declared} bytes is over the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    if size > limit:
        raise DemoError(f"request body of {size if size <= DRAIN_LIMIT else 'over ' + str(DRAIN_LIMIT)} bytes "
                        f"is over the limit of {limit} bytes", 413)
    return b"".join(chunks)


async def _json(request: Request) -> dict[str, Any]:
    raw = await _body(request, MAX_JSON_BYTES)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DemoError(f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DemoError(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def create_app(engine: DemoEngine) -> Starlette:
    """The ASGI app serving ``engine``."""

    def endpoint(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return JSONResponse(await fn(request))
            except DemoError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except Exception as e:  # a bug: answer 500 with its message; the server keeps running
                log.exception("demo request %s failed", request.url.path)
                return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
        return wrapped

    async def info(request: Request) -> Any:
        return engine.info()

    async def sample(request: Request) -> Any:
        body = await _json(request)
        source = body.get("source", "synthetic")
        if source == "synthetic":
            s = await run_in_threadpool(engine.synthetic, body.get("index", 0))
        elif source == "folder":
            s = await run_in_threadpool(engine.folder_sample, body.get("index", 0))
        else:
            raise DemoError(f"'source' must be 'synthetic' or 'folder' (uploads: POST /api/upload), got {source!r}")
        return await run_in_threadpool(engine.describe, s)

    async def upload(request: Request) -> Any:
        data = await _body(request, engine.limits.max_upload_bytes)
        s = await run_in_threadpool(engine.upload, data)
        return await run_in_threadpool(engine.describe, s)

    async def mask(request: Request) -> Any:
        b = await _json(request)
        hidden = await run_in_threadpool(engine.random_mask, b.get("sample"), b.get("budget", engine.default_visible),
                                         b.get("alpha", engine.default_alpha), b.get("seed", 0))
        return {"hidden": hidden}

    async def predict(request: Request) -> Any:
        b = await _json(request)
        return await run_in_threadpool(engine.predict, b.get("sample"), b.get("hidden", {}))

    async def edit(request: Request) -> Any:
        b = await _json(request)
        s = await run_in_threadpool(engine.edit, b.get("sample"), b.get("modality"), b.get("patches"),
                                    b.get("hue"), b.get("class"))
        return await run_in_threadpool(engine.describe, s)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return JSONResponse({"error": f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}"},
                            status_code=code)

    routes = [
        Route("/", index),
        Route("/api/info", endpoint(info)),
        Route("/api/sample", endpoint(sample), methods=["POST"]),
        Route("/api/upload", endpoint(upload), methods=["POST"]),
        Route("/api/mask", endpoint(mask), methods=["POST"]),
        Route("/api/predict", endpoint(predict), methods=["POST"]),
        Route("/api/edit", endpoint(edit), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. DemoError if taken."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise DemoError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _server(engine: DemoEngine, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(create_app(engine), log_level=log_level, access_log=False, lifespan="off",
                            limit_concurrency=1000, timeout_keep_alive=5)
    return uvicorn.Server(config)


def serve(engine: DemoEngine, sock: socket.socket, log_level: str = "warning",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve on a socket from :func:`bind` in the foreground until interrupted; ``on_ready(url)``
    is called just before."""
    server = _server(engine, log_level)
    if on_ready is not None:
        on_ready(url_of(sock))
    server.run(sockets=[sock])


@contextlib.contextmanager
def serving(engine: DemoEngine, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve in a background thread for the duration of the block; yields the URL (tests,
    notebooks)."""
    sock = bind(host, port)
    server = _server(engine, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="multimae-demo")
    thread.start()
    try:
        import time

        for _ in range(500):  # until uvicorn has started (or 10 s)
            if server.started or not thread.is_alive():
                break
            time.sleep(0.02)
        if not server.started:
            raise RuntimeError("the demo server did not start")
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
