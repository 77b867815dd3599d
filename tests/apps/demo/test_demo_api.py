"""Every endpoint of the demo server over real HTTP (uvicorn on 127.0.0.1), bad requests
included, and 200 concurrent requests."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def call(url: str, path: str, body: object = None, raw: bytes | None = None, method: str | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers=headers or {"Content-Type": "application/octet-stream" if path == "/api/upload" else "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=180) as r:  # generous: CI machines can be busy
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ok(url: str, path: str, body: object = None, **kw) -> dict:
    status, data = call(url, path, body, **kw)
    assert status == 200, (status, data)
    return data


def pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")).astype(int)


def image_bytes(w: int, h: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (the pixel data is a stub): a decompression bomb."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_info_describes_the_model(server):
    info = ok(server, "/api/info")
    assert [m["name"] for m in info["inputs"]] == ["rgb", "depth", "semseg"]
    assert [m["name"] for m in info["outputs"]] == ["rgb", "depth", "semseg"]
    assert info["grid"] == [4, 4] and info["tokens"] == 48 and info["budget"] == 12 and info["alpha"] == 1.0
    assert info["sources"] == ["synthetic", "folder", "upload"] and info["folder_size"] == 2
    semseg = info["inputs"][2]
    assert [c["name"] for c in semseg["classes"]][:2] == ["floor", "wall"] and semseg["edit"] == "class"
    assert info["inputs"][0]["edit"] == "hue" and info["inputs"][1]["edit"] is None
    assert info["precision"] in ("fp32", "bf16")


def test_page_and_static_files_are_served(server):
    with urllib.request.urlopen(server, timeout=30) as r:
        html = r.read().decode()
    assert r.status == 200 and "/static/demo.js" in html
    for f in ("demo.js", "demo.css"):
        with urllib.request.urlopen(server + "static/" + f, timeout=30) as r:
            assert r.status == 200 and len(r.read()) > 500


def test_synthetic_sample_mask_and_predict(server):
    s = ok(server, "/api/sample", {"source": "synthetic", "index": 3})
    assert s["title"] == "synthetic scene 3"
    assert {n: v["origin"] for n, v in s["inputs"].items()} == {"rgb": "true", "depth": "true", "semseg": "true"}
    assert pixels(s["inputs"]["rgb"]["image"]).shape == (32, 32, 3)
    assert pixels(s["inputs"]["semseg"]["image"]).shape == (8, 8, 3)  # semseg at stride 4

    m1 = ok(server, "/api/mask", {"sample": s["id"], "budget": 10, "alpha": 1.0, "seed": 1})["hidden"]
    assert sum(16 - len(v) for v in m1.values()) == 10  # exactly the budget is visible
    assert ok(server, "/api/mask", {"sample": s["id"], "budget": 10, "alpha": 1.0, "seed": 1})["hidden"] == m1
    assert ok(server, "/api/mask", {"sample": s["id"], "budget": 10, "alpha": 1.0, "seed": 2})["hidden"] != m1

    p1 = ok(server, "/api/predict", {"sample": s["id"], "hidden": m1})
    assert p1["visible"] == {n: 16 - len(v) for n, v in m1.items()} and p1["model_ms"] > 0
    assert set(p1["outputs"]) == {"rgb", "depth", "semseg"}
    for t, o in p1["outputs"].items():
        assert o["target_origin"] == "true"
        assert pixels(o["pred"]).shape == pixels(o["target"]).shape
    np.testing.assert_array_equal(pixels(p1["outputs"]["rgb"]["target"]), pixels(s["inputs"]["rgb"]["image"]))
    p2 = ok(server, "/api/predict", {"sample": s["id"], "hidden": {}})  # everything visible
    assert p2["visible"] == {"rgb": 16, "depth": 16, "semseg": 16}
    for t in ("rgb", "depth", "semseg"):
        assert not np.array_equal(pixels(p1["outputs"][t]["pred"]), pixels(p2["outputs"][t]["pred"])), t
    p3 = ok(server, "/api/predict", {"sample": s["id"], "hidden": {n: list(range(16)) for n in m1}})
    assert p3["visible"] == {"rgb": 0, "depth": 0, "semseg": 0}  # nothing visible is still an answer


def test_edits_change_only_the_selected_patches(server):
    s = ok(server, "/api/sample", {"source": "synthetic", "index": 1})
    e = ok(server, "/api/edit", {"sample": s["id"], "modality": "rgb", "patches": [0, 5], "hue": 120})
    assert e["id"] != s["id"] and e["inputs"]["rgb"]["origin"] == "true, edited"
    before, after = pixels(s["inputs"]["rgb"]["image"]), pixels(e["inputs"]["rgb"]["image"])
    changed = np.abs(before - after).sum(-1) > 3
    inside = np.zeros((32, 32), bool)
    inside[0:8, 0:8] = inside[8:16, 8:16] = True  # patches 0 and 5 of the 4x4 grid of 8px patches
    assert changed[inside].mean() > 0.3 and not changed[~inside].any()
    np.testing.assert_array_equal(pixels(s["inputs"]["depth"]["image"]), pixels(e["inputs"]["depth"]["image"]))

    c = ok(server, "/api/edit", {"sample": e["id"], "modality": "semseg", "patches": [15], "class": 3})
    seg = pixels(c["inputs"]["semseg"]["image"])
    cone = ok(server, "/api/info")["inputs"][2]["classes"][3]["color"]
    assert (seg[6:8, 6:8] == [int(cone[i:i + 2], 16) for i in (1, 3, 5)]).all()  # patch 15 at stride 4
    assert c["inputs"]["semseg"]["origin"] == "true, edited" and c["inputs"]["rgb"]["origin"] == "true, edited"
    # the original sample is still there and unchanged (samples are immutable)
    p = ok(server, "/api/predict", {"sample": s["id"], "hidden": {}})
    np.testing.assert_array_equal(pixels(p["outputs"]["rgb"]["target"]), before)
    pe = ok(server, "/api/predict", {"sample": c["id"], "hidden": {}})
    assert not np.array_equal(pixels(p["outputs"]["rgb"]["pred"]), pixels(pe["outputs"]["rgb"]["pred"]))


def test_upload_predicts_the_missing_modalities(server):
    s = ok(server, "/api/upload", raw=image_bytes(90, 60, "JPEG"), headers={"Content-Type": "image/jpeg"})
    assert s["inputs"]["rgb"]["origin"] == "uploaded"
    assert s["inputs"]["depth"]["origin"] == s["inputs"]["semseg"]["origin"] == "predicted from rgb"
    p = ok(server, "/api/predict", {"sample": s["id"], "hidden": {"depth": list(range(16))}})
    assert p["outputs"]["depth"]["target_origin"] == "predicted from rgb"
    assert p["outputs"]["rgb"]["target_origin"] == "uploaded"
    big = ok(server, "/api/upload", raw=image_bytes(1500, 1000, "JPEG"))  # allowed, shrunk to 256 px
    assert "256x171" in big["title"]


def test_folder_sample_fills_in_what_the_folder_lacks(server):
    s = ok(server, "/api/sample", {"source": "folder", "index": 1})
    assert {n: v["origin"] for n, v in s["inputs"].items()} == {
        "rgb": "true", "depth": "true", "semseg": "predicted from rgb"}
    assert s["title"].startswith("folder sample all/")


BAD = [
    # (path, json body or raw bytes, expected status, words in the message)
    ("/api/upload", b"hello, not an image", 415, "not an image"),
    ("/api/upload", b"", 400, "empty upload"),
    ("/api/upload", image_bytes(64, 64, "PNG")[:300], 400, "cannot be decoded"),  # truncated PNG
    ("/api/upload", image_bytes(64, 64, "JPEG")[:400], 400, "cannot be decoded"),  # truncated JPEG
    ("/api/upload", png_header_only(3000, 3000), 413, "9000000 pixels"),
    ("/api/upload", png_header_only(100_000, 100_000), 413, "pixels"),
    ("/api/upload", b"\0" * ((1 << 20) + 10), 413, "over the limit"),
    ("/api/sample", b"{not json", 400, "not valid JSON"),
    ("/api/sample", [1, 2], 400, "JSON object"),
    ("/api/sample", {"source": "web"}, 400, "'source'"),
    ("/api/sample", {"source": "synthetic", "index": -1}, 400, "'index'"),
    ("/api/sample", {"source": "synthetic", "index": "3"}, 400, "integer"),
    ("/api/sample", {"source": "synthetic", "index": 2.5}, 400, "integer"),
    ("/api/sample", {"source": "folder", "index": 2}, 400, "[0, 1]"),
    ("/api/predict", {"sample": "nope", "hidden": {}}, 404, "unknown sample"),
    ("/api/predict", {"sample": 7, "hidden": {}}, 400, "sample id"),
    ("/api/predict", {"sample": "@", "hidden": {"rgb": [16]}}, 400, "[0, 15]"),
    ("/api/predict", {"sample": "@", "hidden": {"rgb": [-1]}}, 400, "[0, 15]"),
    ("/api/predict", {"sample": "@", "hidden": {"rgb": ["a"]}}, 400, "integers"),
    ("/api/predict", {"sample": "@", "hidden": {"rgb": [True]}}, 400, "integers"),
    ("/api/predict", {"sample": "@", "hidden": {"rgb": 3}}, 400, "list"),
    ("/api/predict", {"sample": "@", "hidden": {"normals": [1]}}, 400, "normals"),
    ("/api/predict", {"sample": "@", "hidden": [1]}, 400, "'hidden'"),
    ("/api/predict", {"sample": "@", "hidden": {"rgb": list(range(16)) * 10}}, 400, "entries"),
    ("/api/mask", {"sample": "@", "budget": 49, "alpha": 1, "seed": 0}, 400, "'budget'"),
    ("/api/mask", {"sample": "@", "budget": 5, "alpha": 0, "seed": 0}, 400, "'alpha'"),
    ("/api/mask", {"sample": "@", "budget": 5, "alpha": "x", "seed": 0}, 400, "'alpha'"),
    ("/api/mask", {"sample": "@", "budget": 5, "alpha": 1, "seed": -3}, 400, "'seed'"),
    ("/api/edit", {"sample": "@", "modality": "rgb", "patches": [], "hue": 10}, 400, "empty"),
    ("/api/edit", {"sample": "@", "modality": "rgb", "patches": [1]}, 400, "'hue'"),
    ("/api/edit", {"sample": "@", "modality": "rgb", "patches": [99], "hue": 10}, 400, "[0, 15]"),
    ("/api/edit", {"sample": "@", "modality": "semseg", "patches": [1], "class": 6}, 400, "[0, 5]"),
    ("/api/edit", {"sample": "@", "modality": "depth", "patches": [1], "hue": 10}, 400, "cannot be edited"),
    ("/api/edit", {"sample": "@", "modality": "caption", "patches": [1]}, 400, "'modality'"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_requests_get_a_4xx_and_a_message(server, path, body, status, words):
    if isinstance(body, dict) and body.get("sample") == "@":  # a valid sample id
        body = {**body, "sample": ok(server, "/api/sample", {"source": "synthetic", "index": 0})["id"]}
    raw = body if isinstance(body, bytes) else None
    got, data = call(server, path, None if raw is not None else body, raw=raw)
    assert got == status and words in data["error"], (got, data)


def test_wrong_routes_and_methods(server):
    assert call(server, "/api/nothing")[0] == 404
    status, data = call(server, "/api/predict", method="GET")
    assert status == 405 and "error" in data
    assert ok(server, "/api/info")["grid"] == [4, 4]  # still serving after all the bad requests


def test_200_concurrent_requests(server):
    sid = ok(server, "/api/sample", {"source": "synthetic", "index": 2})["id"]
    hidden = ok(server, "/api/mask", {"sample": sid, "budget": 12, "alpha": 1.0, "seed": 0})["hidden"]
    jobs = []
    for i in range(200):
        kind = i % 5
        if kind in (0, 1):
            jobs.append(("/api/predict", {"sample": sid, "hidden": hidden}))
        elif kind == 2:
            jobs.append(("/api/mask", {"sample": sid, "budget": i % 48, "alpha": 0.5, "seed": i}))
        elif kind == 3:
            jobs.append(("/api/edit", {"sample": sid, "modality": "rgb", "patches": [i % 16], "hue": 90}))
        else:
            jobs.append(("/api/sample", {"source": "synthetic", "index": i}))
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda j: call(server, *j), jobs))
    errors = [(j[0], r) for j, r in zip(jobs, results) if r[0] != 200]
    assert not errors, errors[:3]
    preds = [r[1]["outputs"]["depth"]["pred"] for j, r in zip(jobs, results) if j[0] == "/api/predict"]
    assert len(preds) == 80 and len(set(preds)) == 1  # same input and mask -> the same answer every time


def test_the_demo_writes_no_files(server, run_dir, folder_root, tmp_path, monkeypatch):
    def listing(root: Path) -> set:
        return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}
    before = (listing(run_dir.parent), listing(folder_root))
    monkeypatch.chdir(tmp_path)
    s = ok(server, "/api/upload", raw=image_bytes(40, 40))
    ok(server, "/api/predict", {"sample": s["id"], "hidden": {}})
    ok(server, "/api/sample", {"source": "folder", "index": 0})
    assert (listing(run_dir.parent), listing(folder_root)) == before
    assert not any(tmp_path.iterdir())


def test_cli_prints_the_url_and_serves_on_localhost(cli_server):
    assert cli_server.line.startswith("multimae demo: http://127.0.0.1:"), cli_server.line
    assert ok(cli_server.url, "/api/info")["grid"] == [4, 4]


def test_cli_bad_input_exits_2_with_one_line(run_dir, engine, tmp_path, capsys):
    from multimae.cli.main import main

    assert main(["demo", "--checkpoint", str(tmp_path / "none"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(tmp_path / "none") in err and len(err.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["demo", "--checkpoint", str(run_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(run_dir), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_predictions_show_the_visible_input_patches(server):
    s = ok(server, "/api/sample", {"source": "synthetic", "index": 4})
    hidden = {"rgb": list(range(8)), "depth": list(range(16)), "semseg": [15]}
    p = ok(server, "/api/predict", {"sample": s["id"], "hidden": hidden})
    rgb_pred, rgb_tgt = pixels(p["outputs"]["rgb"]["pred"]), pixels(p["outputs"]["rgb"]["target"])
    np.testing.assert_array_equal(rgb_pred[16:], rgb_tgt[16:])  # patches 8..15 (rows 2, 3) were visible
    assert np.abs(rgb_pred[:16] - rgb_tgt[:16]).mean() > 5  # hidden ones are the (random-init) prediction
    seg_pred, seg_tgt = pixels(p["outputs"]["semseg"]["pred"]), pixels(p["outputs"]["semseg"]["target"])
    np.testing.assert_array_equal(seg_pred[:6], seg_tgt[:6])  # only patch 15 (bottom right) hidden
    d = pixels(p["outputs"]["depth"]["pred"])
    assert not np.array_equal(d, pixels(p["outputs"]["depth"]["target"]))  # all hidden: all predicted


def test_edited_titles_do_not_grow(server):
    s = ok(server, "/api/sample", {"source": "synthetic", "index": 6})
    titles = []
    for k in range(4):
        s = ok(server, "/api/edit", {"sample": s["id"], "modality": "rgb", "patches": [k], "hue": 30})
        titles.append(s["title"])
    assert titles == ["synthetic scene 6 (edited)"] * 4


def test_m3ae_caption_over_http(m3ae_engine):
    from multimae.apps.demo.app import serving

    with serving(m3ae_engine) as url:
        info = ok(url, "/api/info")
        assert info["text"]["name"] == "caption" and info["text"]["outputs"] == ["caption"]
        s = ok(url, "/api/sample", {"source": "synthetic", "index": 0})
        words = s["text"]["tokens"]
        assert s["text"]["origin"] == "true" and len(words) > 5 and s["text"]["caption"].startswith(words[0])
        hidden = ok(url, "/api/mask", {"sample": s["id"], "budget": 8, "alpha": 1.0, "seed": 0})["hidden"]
        assert len(hidden["caption"]) == round(info["text"]["ratio"] * len(words))
        p = ok(url, "/api/predict", {"sample": s["id"], "hidden": hidden})
        cap = p["texts"]["caption"]
        assert [i for i, h in enumerate(cap["hidden"]) if h] == hidden["caption"]
        assert [w for w, h in zip(cap["tokens"], cap["hidden"]) if not h] == \
            [w for i, w in enumerate(words) if i not in hidden["caption"]]  # visible words as given
        assert cap["target"] == s["text"]["caption"]
        e = ok(url, "/api/edit", {"sample": s["id"], "modality": "caption", "caption": "a red cone on the left"})
        assert e["text"]["tokens"] == ["a", "red", "cone", "on", "the", "left"] and e["text"]["origin"] == "edited"
        p = ok(url, "/api/predict", {"sample": e["id"], "hidden": {"caption": [1, 2]}})
        assert p["texts"]["caption"]["hidden"] == [False, True, True, False, False, False]
        status, data = call(url, "/api/predict", {"sample": e["id"], "hidden": {"caption": [6]}})
        assert status == 400 and "[0, 5]" in data["error"]
        status, data = call(url, "/api/edit", {"sample": e["id"], "modality": "caption", "caption": 5})
        assert status == 400 and "'caption'" in data["error"]
        u = ok(url, "/api/upload", raw=image_bytes(40, 40))  # an upload has no caption until one is typed
        assert u["text"]["origin"] == "none" and u["text"]["tokens"] == []
        assert ok(url, "/api/predict", {"sample": u["id"], "hidden": {}})["texts"]["caption"]["tokens"] == []
        e = ok(url, "/api/edit", {"sample": u["id"], "modality": "caption", "caption": "a blue box"})
        assert e["text"]["tokens"] == ["a", "blue", "box"] and e["inputs"]["rgb"]["origin"] == "uploaded"
