"""Four byte-level domains from the Python standard library, split by source module.

- ``code``: the stdlib's ``*.py`` source (as examples/corpus.py selects it: tests, IDLE and
  site-packages left out), one document per file, docstrings included as written.
- ``text``: the English reference text of :mod:`pydoc_data.topics`, one document per topic.
- ``docstrings``: every module, class and function docstring of those files (read with ``ast``,
  nothing imported), one document per file.
- ``noise``: a degraded domain as a real crawl has one: the training documents of ``code`` and
  ``text`` with the characters of every line shuffled (same bytes, same line lengths, no
  structure left to learn beyond byte frequencies), shuffled from each side's own documents.

Validation holds out whole documents: a document is in validation when the CRC32 of its name
(file path or topic) falls in the held-out 1/``val_every``; ``docstrings`` follows its file, so no
source file is on both sides. :class:`Windows` cuts a domain into fixed windows of
``block_size + 1`` bytes (the examples of a map-style mixture), and :func:`difficulty` scores a
window by how badly it compresses (zlib): repetitive text first, dense text last.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from trainwarden.examples.corpus import MAX_FILE_BYTES, _stdlib_py_files

__all__ = ["CLEAN_DOMAINS", "DOMAINS", "Split", "Windows", "difficulty", "stdlib_domains"]

DOMAINS = ("code", "text", "docstrings", "noise")
CLEAN_DOMAINS = ("code", "text", "docstrings")


@dataclass(frozen=True)
class Split:
    """Bytes per domain of each side of the split."""

    train: dict[str, bytes]
    val: dict[str, bytes]


def _held_out(name: str, val_every: int) -> bool:
    return zlib.crc32(name.encode()) % val_every == 0


def _docstrings(source: bytes) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _shuffle_lines(data: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for line in data.split(b"\n"):
        chars = list(line)
        rng.shuffle(chars)
        lines.append(bytes(chars))
    return b"\n".join(lines)


@functools.lru_cache(maxsize=4)
def stdlib_domains(max_bytes: int = 2_000_000, val_every: int = 10, seed: int = 0) -> Split:
    """The four domains, each side capped at ``max_bytes`` (whole documents, in sorted order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sides: dict[str, dict[str, list[bytes]]] = {s: {d: [] for d in DOMAINS} for s in ("train", "val")}
    sizes = {s: dict.fromkeys(DOMAINS, 0) for s in ("train", "val")}

    def add(side: str, domain: str, doc: bytes) -> None:
        if doc and sizes[side][domain] < max_bytes:
            sides[side][domain].append(doc)
            sizes[side][domain] += len(doc) + 1

    for path in _stdlib_py_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            source = path.read_bytes()
        except OSError:
            continue
        side = "val" if _held_out(rel, val_every) else "train"
        add(side, "code", source)
        add(side, "docstrings", "\n\n".join(_docstrings(source)).encode("utf-8"))
        if sizes[side]["noise"] < max_bytes // 2:  # half from code, half from text
            add(side, "noise", _shuffle_lines(source, zlib.crc32(rel.encode()) ^ seed))
        if all(sizes["train"][d] >= max_bytes for d in ("code", "docstrings")):
            break
    from pydoc_data.topics import topics

    for key in sorted(topics):
        side = "val" if _held_out("topic:" + key, val_every) else "train"
        doc = topics[key].encode("utf-8")
        add(side, "text", doc)
        add(side, "noise", _shuffle_lines(doc, zlib.crc32(key.encode()) ^ seed))
    return Split(
        train={d: b"\n".join(sides["train"][d])[:max_bytes] for d in DOMAINS},
        val={d: b"\n".join(sides["val"][d])[:max_bytes] for d in DOMAINS},
    )


class Windows(Dataset):
    """Non-overlapping windows of ``block_size + 1`` bytes: item i is (x, y), y = x shifted by one."""

    def __init__(self, data: bytes, block_size: int) -> None:
        n = (len(data) - 1) // block_size
        if n < 1:
            raise ValueError(f"{len(data)} bytes make no window of {block_size + 1}")
        self.block_size = block_size
        self.data = torch.frombuffer(bytearray(data[: n * block_size + 1]), dtype=torch.uint8)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        w = self.data[i * self.block_size : (i + 1) * self.block_size + 1].long()
        return w[:-1], w[1:]

    def raw(self, i: int) -> bytes:
        return bytes(self.data[i * self.block_size : (i + 1) * self.block_size + 1].tolist())


def difficulty(windows: Windows) -> np.ndarray:
    """Per window: zlib-compressed size over raw size (lower is more repetitive, easier)."""
    out = np.empty(len(windows))
    for i in range(len(windows)):
        raw = windows.raw(i)
        out[i] = len(zlib.compress(raw, 6)) / len(raw)
    return out
