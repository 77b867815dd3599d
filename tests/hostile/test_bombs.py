"""Decompression bombs (a small file whose header declares a huge image) are bad data: a
:class:`~multimae.data.errors.ImageTooLargeError` naming the file, raised from the header before
any pixel is decoded, skipped under ``data.on_error=skip``, named by ``data check``."""
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from multimae.cli.main import main
from multimae.data.codecs import decode_image
from multimae.data.errors import DataError, ImageTooLargeError


def bomb_png(path, side: int) -> None:
    """A ~100-byte PNG declaring side x side RGB pixels (its data is not there: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 40_000])  # over PIL's limit (where PIL only warns), over twice it
def test_bomb_is_the_named_data_error(tmp_path, side):
    path = tmp_path / "bomb.png"
    bomb_png(path, side)
    with pytest.raises(ImageTooLargeError, match=f"{path}: .*pixels") as err:
        decode_image(path.read_bytes(), 3, str(path))
    assert isinstance(err.value, DataError) and len(str(err.value)) < 300


def test_bomb_in_a_training_folder_is_skipped_and_named_by_data_check(tmp_path, capsys, caplog):
    from finetune_trees import SEG, finetune, seg_tree

    seg_tree(tmp_path, ["train", "test"], n=4)
    bomb = tmp_path / "train" / "rgb" / "all" / "s1.png"
    bomb_png(bomb, 12_000)
    assert finetune(tmp_path, "folder-semseg", tmp_path, *SEG, "data.on_error=raise") == 2
    assert str(bomb) in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        assert finetune(tmp_path, "folder-semseg", tmp_path, *SEG, "data.on_error=skip", "train.run_name=s") == 0
    assert any(str(bomb) in r.getMessage() and "pixels" in r.getMessage() for r in caplog.records)
    assert main(["data", "check", "--folder", str(tmp_path), "--modalities", "rgb,semseg"]) == 1
    err = capsys.readouterr().err
    assert str(bomb) in err and "MAX_IMAGE_PIXELS" in err


def test_a_large_real_image_under_the_limit_still_decodes():
    arr = np.zeros((3000, 4000, 3), np.uint8)  # 12 MP
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert tuple(decode_image(buf.getvalue(), 3, "photo").shape) == (3, 3000, 4000)
