"""Cheap decompression-bomb PNGs for the pixel-guard tests: a lying header, or a real but compressible image."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """An 80-byte PNG whose IHDR (valid CRC) declares ``width`` x ``height`` 8-bit gray pixels; no real data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _chunk(b"IEND", b""))


def black_png(width: int, height: int) -> bytes:
    """A valid, fully decodable all-black 8-bit gray PNG of ``width`` x ``height``, compressed row by row.

    16384 x 16384 (268M pixels) is about 260 KB and takes about a second to build.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0 + the row's pixels
    rows_per_block = max(1, (1 << 22) // len(row))
    block = row * rows_per_block
    parts = []
    done = 0
    while done < height:
        n = min(rows_per_block, height - done)
        parts.append(compressor.compress(block if n == rows_per_block else row * n))
        done += n
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
