"""The demo's web side: a Starlette (ASGI) app served by uvicorn, and one static page.

Endpoints (JSON in and out; errors are ``{"error": message}`` with a 4xx status):

* ``GET /``: the page; ``GET /static/...``: its script and style.
* ``GET /api/info``: the model's modalities, patch grid, default budget and alpha, sources.
* ``POST /api/sample`` ``{"source": "synthetic"|"folder", "index": i}``: a new input sample.
* ``POST /api/upload`` (body: the image file's bytes): a sample from an uploaded image.
* ``POST /api/mask`` ``{"sample", "budget", "alpha", "seed"}``: a random Dirichlet mask.
* ``POST /api/predict`` ``{"sample", "hidden": {modality: [patch (caption: word) indices]}}``:
  predictions (for a prediction of an input modality, its visible patches are the input) and,
  for an M3AE run, ``texts``: the caption with its hidden words predicted.
* ``POST /api/edit`` ``{"sample", "modality", "patches", "hue" | "class"}`` or
  ``{"sample", "modality": "caption", "caption": text}``: an edited sample.

Limits: request line + headers within ``HEADER_TIMEOUT`` s and ``MAX_HEAD_BYTES`` (else the
connection is closed, or answered 414 / 431); a request body within ``BODY_TIMEOUT`` s (else 408);
at most ``MAX_UPLOADS`` uploads buffered and decoded at once (another one waits up to
``UPLOAD_WAIT`` s for its turn, unread, then gets a 503: stalled uploads cannot hold the memory or
the connections other requests need); JSON endpoints take only ``Content-Type:
application/json``, uploads only ``image/*`` or ``application/octet-stream`` (else 415: a
cross-site page cannot POST to them without a CORS preflight); only the Host names of
:func:`allowed_hosts` are answered (DNS rebinding); error messages quote at most 200 characters
of what the client sent.

Model calls run in the thread pool behind one lock (:class:`~multimae.apps.demo.engine.DemoEngine`),
so concurrent requests queue instead of racing. Nothing is written to disk: uploads are decoded
in memory and samples live in a bounded in-memory store.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from multimae.apps.demo.engine import DemoEngine
from multimae.apps.demo.errors import DemoError, clip, short

STATIC = Path(__file__).parent / "static"
MAX_JSON_BYTES = 1 << 20
DRAIN_LIMIT = 64 << 20  # bodies over the limit but under this are read to the end before the 413
HEADER_TIMEOUT = 10.0  # seconds a client has to send a request's line and headers
BODY_TIMEOUT = 30.0  # seconds a client has to send a request's body once its head is in
MAX_UPLOADS = 8  # uploads read and decoded at once (each up to Limits.max_upload_bytes)
UPLOAD_WAIT = 5.0  # seconds an upload waits for its turn before a 503
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle kept-alive connection stays open
MAX_HEAD_BYTES = 32 << 10  # request line + headers; longer ones get a 414 / 431
LINGER_BYTES, LINGER_SECONDS = 16 << 20, 5.0  # after such an answer, the rest of the request is read and dropped
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
IMAGE_TYPES = ("image/", "application/octet-stream")
log = logging.getLogger("multimae.apps.demo")


async def _body(request: Request, limit: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """The request body; 413 past ``limit`` bytes, 408 when it is not all in within ``timeout``
    seconds. A body up to ``DRAIN_LIMIT`` is read to its end first (and dropped), so that the
    client, still sending, gets the 413 rather than a reset connection; a larger one is refused
    at once."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max(limit, DRAIN_LIMIT):
        raise DemoError(f"request body of {declared} bytes is over the limit of {limit} bytes", 413)
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT:
                break
    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        chunks.clear()
        raise DemoError(f"request body not received within {timeout:g} s ({size} bytes came)", 408) from None
    if size > limit:
        raise DemoError(f"request body of {size if size <= DRAIN_LIMIT else 'over ' + str(DRAIN_LIMIT)} bytes "
                        f"is over the limit of {limit} bytes", 413)
    return b"".join(chunks)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_body(request: Request, timeout: float = BODY_TIMEOUT) -> dict[str, Any]:
    ctype = _content_type(request)
    if ctype != "application/json":  # a cross-site form or text/plain POST never gets this far
        raise DemoError(f"request body must be JSON sent as Content-Type: application/json, got "
                        f"{short(ctype or 'none')}", 415)
    raw = await _body(request, MAX_JSON_BYTES, timeout)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DemoError(f"request body is not valid JSON ({e})") from None
    except RecursionError:
        raise DemoError("request body is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise DemoError(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def allowed_hosts(host: str | None = None) -> list[str]:
    """The Host header names the server answers (DNS rebinding: a page of another site whose
    name resolves to 127.0.0.1 sends its own name): this machine's, and ``host`` if given (for
    0.0.0.0 / ::, the machine's host name and its addresses)."""
    names = list(LOCAL_HOSTS)
    if host in ("0.0.0.0", "::", ""):  # every interface: this machine's own names and addresses
        try:
            hostname = socket.gethostname()
            names += [hostname, socket.getfqdn(), *socket.gethostbyname_ex(hostname)[2]]
        except OSError:
            pass
    elif host:
        names.append(host)
    return list(dict.fromkeys((f"[{n}]" if ":" in n and not n.startswith("[") else n).lower() for n in names))


def create_app(engine: DemoEngine, hosts: list[str] | None = None, body_timeout: float = BODY_TIMEOUT,
               max_uploads: int = MAX_UPLOADS, upload_wait: float = UPLOAD_WAIT) -> Starlette:
    """The ASGI app serving ``engine``; requests whose Host is not in ``hosts`` (default:
    :func:`allowed_hosts`) get a 400; a body has ``body_timeout`` seconds to arrive; at most
    ``max_uploads`` uploads are buffered at once, another waits ``upload_wait`` s for its turn."""
    slots = asyncio.Semaphore(max_uploads)  # uploads being read or decoded

    async def _json(request: Request) -> dict[str, Any]:
        return await _json_body(request, body_timeout)

    def endpoint(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return JSONResponse(await fn(request))
            except DemoError as e:
                return JSONResponse({"error": clip(str(e))}, status_code=e.status)
            except ClientDisconnect:  # the client went away mid-request: nobody to answer
                log.info("demo request %s: the client disconnected", request.url.path)
                return Response(status_code=400)
            except Exception as e:  # a bug: answer 500 with its message; the server keeps running
                log.exception("demo request %s failed", request.url.path)
                return JSONResponse({"error": clip(f"internal error: {type(e).__name__}: {e}")}, status_code=500)
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
            raise DemoError(f"'source' must be 'synthetic' or 'folder' (uploads: POST /api/upload), got {short(source)}")
        return await run_in_threadpool(engine.describe, s)

    async def upload(request: Request) -> Any:
        ctype = _content_type(request)
        if not ctype.startswith(IMAGE_TYPES):
            raise DemoError(f"an upload is the image file's bytes sent as Content-Type: image/... or "
                            f"application/octet-stream, got {short(ctype or 'none')}", 415)
        try:
            await asyncio.wait_for(slots.acquire(), upload_wait)
        except asyncio.TimeoutError:
            raise DemoError(f"{max_uploads} uploads are in progress, the most at once; try again shortly",
                            503) from None
        try:
            data = await _body(request, engine.limits.max_upload_bytes, body_timeout)
            s = await run_in_threadpool(engine.upload, data)
            del data
        finally:
            slots.release()
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
                                    b.get("hue"), b.get("class"), b.get("caption"))
        return await run_in_threadpool(engine.describe, s)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return JSONResponse({"error": f"{request.method} {short(request.url.path)}: "
                                      f"{getattr(exc, 'detail', 'not found')}"}, status_code=code)

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
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts or allowed_hosts())])


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


def _protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with what it lacks: a deadline for a request's line and headers
    (a slowloris client that sends a partial request line is cut off after ``header_timeout``
    seconds), and a 414 / 431 answer to an over-long request line or headers (uvicorn answers a
    400 and closes at once, so a client still sending gets a reset instead) followed by a
    lingering close: the rest of the request is read and dropped before the connection closes."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DemoH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _linger = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head within %.0f s", header_timeout)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._linger:
                self._linger -= len(data)
                if self._linger <= 0:
                    self.transport.close()
                return
            idle = self.cycle is None or self.cycle.response_complete
            if idle:
                self._arm()  # a new request head starts (or goes on)
                buffered = self.conn.trailing_data[0] + data
                end = buffered.find(b"\r\n\r\n")  # h11 checks the size only of an incomplete head
                if end > MAX_HEAD_BYTES or (end < 0 and len(buffered) > MAX_HEAD_BYTES):
                    self._answer(buffered, "")
                    return
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the head is complete

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._answer(self.conn.trailing_data[0], msg)

        def _answer(self, buffered: bytes, msg: str) -> None:
            """Answer 414 / 431 (head over the limit) or 400 with ``msg``, then close lingering."""
            self._disarm()
            end = buffered.find(b"\r\n\r\n")
            if end > MAX_HEAD_BYTES or (end < 0 and len(buffered) > MAX_HEAD_BYTES):
                line_done = 0 <= buffered.find(b"\r\n") <= MAX_HEAD_BYTES
                status, reason = (431, b"Request Header Fields Too Large") if line_done else (414, b"URI Too Long")
                what = "request headers are" if line_done else "request line (URL) is"
                msg = f"the {what} over the limit of {MAX_HEAD_BYTES} bytes"
            else:
                status, reason = 400, b"Bad Request"
            body = json.dumps({"error": msg}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n" % (status, reason, len(body)) + body)
            if self.transport.can_write_eof():  # lingering close: the client reads the answer, not a reset
                self.transport.write_eof()
                self._linger = LINGER_BYTES
                self.loop.call_later(LINGER_SECONDS, self.transport.close)
            else:
                self.transport.close()

    return DemoH11Protocol


def _server(engine: DemoEngine, log_level: str, host: str | None = None, header_timeout: float = HEADER_TIMEOUT,
            body_timeout: float = BODY_TIMEOUT, max_uploads: int = MAX_UPLOADS, upload_wait: float = UPLOAD_WAIT) -> Any:
    import uvicorn

    config = uvicorn.Config(create_app(engine, allowed_hosts(host), body_timeout, max_uploads, upload_wait), log_level=log_level, access_log=False,
                            lifespan="off", limit_concurrency=1000, timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES, http=_protocol(header_timeout))
    return uvicorn.Server(config)


def serve(engine: DemoEngine, sock: socket.socket, log_level: str = "warning",
          on_ready: Callable[[str], None] | None = None, host: str | None = None) -> None:
    """Serve on a socket from :func:`bind` in the foreground until interrupted; ``on_ready(url)``
    is called just before. ``host``: the name given to :func:`bind`, answered as a Host header
    besides this machine's names."""
    server = _server(engine, log_level, host or sock.getsockname()[0])
    if on_ready is not None:
        on_ready(url_of(sock))
    server.run(sockets=[sock])


@contextlib.contextmanager
def serving(engine: DemoEngine, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
            header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
            max_uploads: int = MAX_UPLOADS, upload_wait: float = UPLOAD_WAIT) -> Iterator[str]:
    """Serve in a background thread for the duration of the block; yields the URL (tests,
    notebooks)."""
    sock = bind(host, port)
    server = _server(engine, log_level, host, header_timeout, body_timeout, max_uploads, upload_wait)
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
