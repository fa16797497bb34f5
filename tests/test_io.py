"""Reading odd images: every failure is an InputError with a one-line reason."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from reliableswap.images import InputError, read_image, to_tensor, to_uint8
from triplets.jsonl import atomic_dir, atomic_write_bytes, temp_owner


def test_sixteen_bit_and_gray_and_alpha(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), ramp)
    rgb16 = np.stack([ramp, ramp // 2, 65535 - ramp], -1)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])
    Image.fromarray((ramp >> 8).astype(np.uint8), "L").save(tmp_path / "g8.png")
    Image.fromarray(np.dstack([np.full((64, 64, 3), 200, np.uint8), np.zeros((64, 64), np.uint8)]), "RGBA").save(tmp_path / "a.png")

    g16, _ = read_image(tmp_path / "g16.png")
    assert g16.shape == (64, 64, 3) and g16.dtype == np.uint8
    assert abs(int(g16[-1, -1, 0]) - round(ramp[-1, -1] / 257)) <= 1  # scaled, not truncated
    c16, _ = read_image(tmp_path / "c16.png")
    assert c16.shape == (64, 64, 3) and c16[-1, -1, 2] < c16[-1, -1, 0]
    g8, _ = read_image(tmp_path / "g8.png")
    assert g8.shape == (64, 64, 3) and (g8[..., 0] == g8[..., 2]).all()
    a, _ = read_image(tmp_path / "a.png")
    assert a.shape == (64, 64, 3) and (a == 200).all()  # alpha dropped, colour kept


def test_large_jpeg_decoded_reduced_with_scale(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3), np.uint8)
    big = cv2.resize(img, (8000, 4800), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(tmp_path / "big.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 70])
    rgb, scale = read_image(tmp_path / "big.jpg")
    assert scale == 2.0 and rgb.shape == (2400, 4000, 3)


@pytest.mark.parametrize(
    "content, expect",
    [(b"", "empty file"), (b"<!DOCTYPE html><html></html>", "HTML"), (b"hello world\n", "plain text"),
     (b"\x00\x01\x02garbage" * 10, "not an image")],
)
def test_bad_bytes_give_one_line_reason(tmp_path, content, expect):
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_image(p)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_tensor_roundtrip():
    rgb = np.random.default_rng(1).integers(0, 255, (20, 30, 3), np.uint8)
    t = to_tensor(rgb)
    assert t.shape == (1, 3, 20, 30) and float(t.max()) <= 1.0
    assert (to_uint8(t)[0] == rgb).all()


def test_atomic_writes_leave_no_temp_and_name_their_writer(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    assert (tmp_path / "b.bin").read_bytes() == b"x" and not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "b.bin").stat().st_mode & 0o044  # readable by others, like a plain write
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "a.txt").write_text("a")
        assert temp_owner(tmp.name) > 0 and not (tmp_path / "folder").exists()
    assert (tmp_path / "folder" / "a.txt").read_text() == "a" and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "broken") as tmp:  # a failure leaves nothing
        raise RuntimeError
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".*.tmp"))
