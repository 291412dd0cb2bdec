"""The layers x experts load heatmap: a CSV of every recorded step and a PNG of the mean shares, written with the
standard library only (no plotting package is a dependency). Pure torch."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["write_heatmap_csv", "write_heatmap_png", "share_colour"]

CELL = 24  # pixels per heatmap cell


def write_heatmap_csv(path: Path, layers: list[str], steps: list[int], shares: list[Tensor]) -> Path:
    """One row per (step, layer, expert): its share of the layer's routing slots in that step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "layer", "expert", "share"])
        for step, matrix in zip(steps, shares):
            for layer, row in zip(layers, matrix.tolist()):
                for expert, share in enumerate(row):
                    writer.writerow([step, layer, expert, f"{share:.6f}"])
    return path


def share_colour(relative: float) -> tuple[int, int, int]:
    """Colour of a share relative to uniform (share x E): blue for starved (0), white for uniform (1), red for
    overloaded (2 and above)."""
    x = min(max(relative, 0.0), 2.0)
    if x <= 1.0:  # blue -> white
        return int(255 * x), int(255 * x), 255
    return 255, int(255 * (2.0 - x)), int(255 * (2.0 - x))  # white -> red


def write_heatmap_png(path: Path, shares: Tensor) -> Path:
    """An RGB PNG with one CELL x CELL square per (layer row, expert column), coloured by `share_colour`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, cols = shares.shape
    relative = (shares.double() * cols).tolist()
    lines = []
    for r in range(rows):
        line = b"".join(bytes(share_colour(v)) * CELL for v in relative[r])
        lines.extend([b"\x00" + line] * CELL)  # filter byte 0 per scanline
    width, height = cols * CELL, rows * CELL

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(lines), 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def read_png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG header (for checks)."""
    data = Path(path).read_bytes()[:24]
    return struct.unpack(">II", data[16:24])


def mean_shares(shares: list[Tensor]) -> Tensor:
    return torch.stack(shares).mean(dim=0) if shares else torch.zeros(0, 0)
