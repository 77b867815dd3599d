"""One image decoder for every reader (folder, shards, captions, visualize, pseudolabel, demo,
predict): real photos with an EXIF orientation come out upright, 16-bit greyscale keeps its
gradations, transparency becomes the documented background colour, 8-bit depth is not read as
normals."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from multimae.data.codecs import ALPHA_BACKGROUND, decode_field, decode_image
from multimae.data.folder import FolderDataset
from multimae.data.shards import ShardDataset, write_shards
from multimae.core.modalities import get


def _jpeg(arr, orientation=None):
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, "JPEG", quality=95)
    else:
        ex = img.getexif()
        ex[0x0112] = orientation
        img.save(buf, "JPEG", quality=95, exif=ex.tobytes())
    return buf.getvalue()


PHOTO = skdata.chelsea()[:120, :200]  # a landscape cat photo, 120 x 200


@pytest.mark.parametrize("orientation,upright", [
    (6, lambda a: np.rot90(a, -1)),  # "rotate 90 CW to display": a phone held upright
    (8, lambda a: np.rot90(a, 1)),
    (3, lambda a: np.rot90(a, 2)),
])
def test_exif_orientation_is_applied(orientation, upright):
    plain = decode_image(_jpeg(PHOTO), 3, "x").permute(1, 2, 0).numpy().astype(np.int16)
    rotated = decode_image(_jpeg(PHOTO, orientation), 3, "x").permute(1, 2, 0).numpy().astype(np.int16)
    want = upright(plain)
    assert rotated.shape == want.shape
    assert np.abs(rotated - want).mean() < 2.0  # same JPEG pixels, turned upright (re-encoding noise only)


def test_16bit_greyscale_keeps_its_gradations():
    grey = (skdata.camera().astype(np.uint32) * 257).astype(np.uint16)  # the camera photo at 16 bits
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    out = decode_image(buf.getvalue(), 3, "x")
    assert out.shape == (3, *grey.shape)
    assert torch.equal(out[0], torch.from_numpy(skdata.camera()))  # exactly the 8-bit photo, not white
    assert torch.equal(out[0], out[2])


def test_transparency_becomes_the_background_colour():
    rgba = np.dstack([skdata.astronaut()[:64, :64], np.full((64, 64), 255, np.uint8)])
    rgba[:, 32:, 3] = 0  # right half fully transparent (its colour channels keep the photo)
    rgba[:16, :32, 3] = 128  # half transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = decode_image(buf.getvalue(), 3, "x").permute(1, 2, 0).numpy().astype(int)
    assert (out[:, 32:] == ALPHA_BACKGROUND).all()
    assert np.array_equal(out[16:, :32], rgba[16:, :32, :3])  # opaque pixels unchanged
    half = (rgba[:16, :32, :3].astype(int) + np.array(ALPHA_BACKGROUND)) / 2
    assert np.abs(out[:16, :32] - half).max() <= 1
    # a palette image with a transparent index goes the same way
    p = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p.info["transparency"] = 0
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    idx = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    pout = decode_image(buf.getvalue(), 3, "x").permute(1, 2, 0).numpy()
    assert (pout[idx == 0] == ALPHA_BACKGROUND).all()


def test_8bit_depth_png_is_scaled_not_read_as_normals(caplog):
    depth8 = np.clip(skdata.camera()[:32, :32], 1, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(depth8).save(buf, "PNG")
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        out = decode_field(buf.getvalue(), "png", get("depth"), 0.01, "depth file d/all/a.png")
    assert torch.allclose(out[0], torch.from_numpy(depth8.astype(np.float32) * 0.01))
    assert any("8-bit PNG" in r.getMessage() and "d/all/a.png" in r.getMessage() for r in caplog.records)
    # normals (3 channels) keep the signed unit convention
    n8 = np.full((4, 4, 3), 255, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(n8).save(buf, "PNG")
    assert torch.allclose(decode_field(buf.getvalue(), "png", get("depth").with_(name="normal", channels=3), 1.0,
                                       "n"), torch.ones(3, 4, 4))


def test_readers_decode_a_phone_photo_upright(tmp_path):
    """The folder and shard readers: an orientation-6 JPEG with its depth map at the upright size."""
    jpg = _jpeg(PHOTO, 6)
    upright = decode_image(jpg, 3, "x")
    depth = np.full((200, 120), 1500, np.uint16)  # upright size: 200 high, 120 wide (millimetres)
    buf = io.BytesIO()
    Image.fromarray(depth).save(buf, "PNG")
    for key, payload, ext in (("rgb", jpg, "jpg"), ("depth", buf.getvalue(), "png")):
        f = tmp_path / "train" / key / "all" / f"cat.{ext}"
        f.parent.mkdir(parents=True)
        f.write_bytes(payload)
    ds = FolderDataset(tmp_path, "train", ["rgb", "depth"], png_scale=1e-3)
    s = ds[0]
    assert torch.equal(s["rgb"], upright) and s["rgb"].shape == (3, 200, 120)
    assert s["depth"].shape == (1, 200, 120) and torch.allclose(s["depth"], torch.full((1, 200, 120), 1.5))
    urls = write_shards([{"__key__": "cat", "rgb.jpg": jpg, "depth.png": buf.getvalue()}], str(tmp_path / "s-%06d.tar"), 10)
    (sh,) = list(ShardDataset(urls, ["rgb", "depth"], png_scale=1e-3))
    assert torch.equal(sh["rgb"], upright)
