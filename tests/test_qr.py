"""gateway.qr: the QR code of an otpauth URI, as a PNG that a real decoder reads back.

The PNG is written by hand (no Pillow), so the proof is a round trip through ``zbarimg``
(zbar-tools), the decoder a phone's camera app is built on.
"""

from __future__ import annotations

import base64
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from gateway.qr import png_data_url, png_from_matrix, qr_matrix, qr_png
from gateway.totp import TotpParams, new_secret, provisioning_uri
from tests.conftest import need_binary


def decode(png: bytes, tmp_path: Path) -> str:
    path = tmp_path / "qr.png"
    path.write_bytes(png)
    zbarimg = need_binary("zbarimg")
    done = subprocess.run([zbarimg, "--quiet", "--raw", str(path)], capture_output=True, check=True, timeout=30)
    return done.stdout.decode("utf-8").rstrip("\n")


@pytest.mark.parametrize(
    ("account", "issuer"),
    [("alice", "Gateway"), ("José Müller@example.com", "Ünïcode & Co"), ("x" * 256, "Gateway")],
)
def test_an_otpauth_uri_round_trips_through_a_real_decoder(tmp_path: Path, account: str, issuer: str) -> None:
    uri = provisioning_uri(new_secret(), account, issuer, TotpParams())
    assert decode(qr_png(uri), tmp_path) == uri


@pytest.mark.parametrize("scale", [3, 6, 10])  # zbar needs a few pixels a module
def test_every_scale_decodes(tmp_path: Path, scale: int) -> None:
    uri = provisioning_uri(new_secret(), "alice", "Gateway", TotpParams())
    assert decode(png_from_matrix(qr_matrix(uri), scale), tmp_path) == uri


def test_the_png_is_what_its_header_says() -> None:
    """PNG §11.2.2: IHDR width and height; bit depth 1, grayscale; each module scale² pixels."""
    matrix = qr_matrix("otpauth://totp/x?secret=JBSWY3DPEHPK3PXP")
    png = png_from_matrix(matrix, 2)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    assert width == height == len(matrix) * 2 and (depth, colour) == (1, 0)
    assert len(matrix) >= 21 + 2 * 4  # version 1 at least, with the 4-module quiet zone (ISO/IEC 18004 §7.3)
    assert not any(matrix[0]) and not any(row[0] for row in matrix)  # the quiet zone is light
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    rows = zlib.decompress(png[41 : 41 + length])
    assert len(rows) == height * (1 + (width + 7) // 8)  # a filter byte and whole bytes per row


def test_an_empty_matrix_or_a_zero_scale_is_refused() -> None:
    with pytest.raises(ValueError):
        png_from_matrix([], 6)
    with pytest.raises(ValueError):
        png_from_matrix([[True]], 0)


def test_the_data_url_carries_the_png_itself() -> None:
    png = qr_png("otpauth://totp/x?secret=JBSWY3DPEHPK3PXP")
    url = png_data_url(png)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.partition(",")[2]) == png
