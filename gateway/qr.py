"""QR codes for enrolment: the modules come from ``qrcode``, the PNG is written here.

``qrcode`` makes PNGs only through Pillow or pypng. Neither is needed: a QR code is a 1-bit
image, and a 1-bit grayscale PNG is a signature, three chunks and one ``zlib`` stream
(PNG spec, ISO/IEC 15948 §5 and §11), about 20 lines. That keeps the gateway free of an
image library in closed networks where every dependency has to be vetted.
"""

from __future__ import annotations

import base64
import struct
import zlib

import qrcode
import qrcode.constants

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def qr_matrix(data: str, border: int = 4) -> list[list[bool]]:
    """The QR modules of ``data`` (True is dark), with a quiet zone of ``border`` modules.

    Error correction level M (15 %): a phone camera reads it from a screen at any size, and
    ISO/IEC 18004 §7.3 asks for the 4-module quiet zone kept here.
    """
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=border)
    qr.add_data(data)
    qr.make(fit=True)
    return [[bool(module) for module in row] for row in qr.get_matrix()]


def _chunk(kind: bytes, data: bytes) -> bytes:
    # PNG §5.3: length, type, data, CRC-32 over type and data.
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_matrix(matrix: list[list[bool]], scale: int = 6) -> bytes:
    """A 1-bit grayscale PNG of ``matrix``, each module ``scale`` pixels square."""
    if not matrix or scale < 1:
        raise ValueError("an empty matrix or a scale below 1")
    size = len(matrix) * scale
    rows = bytearray()
    for row in matrix:
        bits = "".join(("0" if dark else "1") * scale for dark in row)  # bit 1 is white
        bits += "0" * (-len(bits) % 8)  # PNG §7.2: each scanline is padded to a whole byte
        line = b"\x00" + int(bits, 2).to_bytes(len(bits) // 8, "big")  # filter type 0 (None)
        rows += line * scale
    # IHDR: width, height, bit depth 1, colour type 0 (grayscale), deflate, filter 0, no interlace.
    header = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + _chunk(b"IEND", b"")


def qr_png(data: str, scale: int = 6) -> bytes:
    """The QR code of ``data`` as PNG bytes."""
    return png_from_matrix(qr_matrix(data), scale)


def png_data_url(png: bytes) -> str:
    """``data:image/png;base64,...``: inline in JSON and in the page, no second request (and
    so no second place where the secret could be cached or logged)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
