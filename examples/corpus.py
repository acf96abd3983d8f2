"""A real, byte-level, two-domain corpus that every Python installation already has.

No downloads: the two domains come from the interpreter itself.

- ``"code"``: the standard library's own ``*.py`` source (tests, IDLE, lib2to3, site-packages and
  files over 200 KB left out), read as bytes in sorted path order and joined with ``b"\\n"``.
- ``"prose"``: the English reference text shipped in :mod:`pydoc_data.topics` (what ``help()``
  prints), its values joined in sorted key order and encoded as UTF-8.

Bytes are tokens (vocabulary 256), so no tokenizer is needed. The last 5% of each domain is the
validation split. :class:`WindowSampler` draws training windows with per-domain mixture weights
that a data policy can change mid-run (:meth:`WindowSampler.set_weights`), and its position can be
saved and restored exactly (:meth:`WindowSampler.state_dict`).

The stdlib differs between Python versions, so the corpus is deterministic per interpreter, not
across interpreters.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DOMAIN_NAMES",
    "VAL_FRACTION",
    "Batch",
    "WindowSampler",
    "eval_batches",
    "load_code_domain",
    "load_domains",
    "load_prose_domain",
    "split_domain",
]

DOMAIN_NAMES: tuple[str, ...] = ("code", "prose")
VAL_FRACTION = 0.05
DEFAULT_MAX_BYTES = 8_000_000
MAX_FILE_BYTES = 200_000

# Directory names pruned from the stdlib walk: test suites (huge, repetitive, unlike user code),
# IDLE and lib2to3 (apps/grammar data rather than library code) and anything installed by pip.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
)


def _stdlib_py_files(root: Path) -> list[Path]:
    """Every eligible ``*.py`` under ``root``, sorted by POSIX relative path (deterministic)."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def load_code_domain(max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The stdlib source as one byte string, capped at ``max_bytes`` (first bytes in sorted order)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    total = 0
    for path in _stdlib_py_files(root):
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue  # unreadable or vanished file: skip it, the rest is still deterministic
        parts.append(data)
        total += len(data) + 1
        if total >= max_bytes:  # stop reading early: the cap is what we keep
            break
    if not parts:
        raise RuntimeError(f"no stdlib *.py files found under {root}")
    return b"\n".join(parts)[:max_bytes]


def load_prose_domain(max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The English text of ``pydoc_data.topics``, in sorted key order, UTF-8, capped at ``max_bytes``."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it (e.g. minimal Debian python3)
        raise RuntimeError(
            "the 'prose' domain needs the standard library's pydoc_data package, which this "
            "Python lacks; install the full standard library (e.g. Debian's 'python3-doc' / "
            "'libpython3-stdlib') or use a python.org / pyenv build"
        ) from exc
    text = "\n".join(topics[key] for key in sorted(topics))
    return text.encode("utf-8")[:max_bytes]


@functools.lru_cache(maxsize=4)
def _load_domains_cached(max_bytes_per_domain: int) -> tuple[tuple[str, torch.Tensor], ...]:
    code = load_code_domain(max_bytes_per_domain)
    prose = load_prose_domain(max_bytes_per_domain)
    # frombuffer over a bytearray copy: one allocation, no Python-level per-byte work.
    return tuple(
        (name, torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        for name, raw in (("code", code), ("prose", prose))
    )


def load_domains(max_bytes_per_domain: int = DEFAULT_MAX_BYTES) -> dict[str, torch.Tensor]:
    """Both domains as 1-D uint8 tensors, ``{"code": ..., "prose": ...}``.

    Cached per process and per cap: the tensors are shared between callers, treat them as
    read-only. The returned dict is a fresh copy each call.
    """
    return dict(_load_domains_cached(int(max_bytes_per_domain)))


def split_domain(data: torch.Tensor, split: str) -> torch.Tensor:
    """The ``"train"`` (first 95%), ``"val"`` (last 5%) or ``"all"`` part of one domain (a view)."""
    cut = len(data) - int(len(data) * VAL_FRACTION)
    if split == "train":
        return data[:cut]
    if split == "val":
        return data[cut:]
    if split == "all":
        return data
    raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


@dataclass(frozen=True)
class Batch:
    """A batch of byte windows: ``x`` inputs, ``y`` next-byte targets, ``domain`` index per sample."""

    x: torch.Tensor  # LongTensor [B, T]
    y: torch.Tensor  # LongTensor [B, T], x shifted left by one
    domain: torch.Tensor  # LongTensor [B], index into domain_names
    domain_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.x.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
            self.domain.to(device, non_blocking=non_blocking),
            self.domain_names,
        )

    def micro_batches(self, micro_batch_size: int) -> list[Batch]:
        """Consecutive slices of at most ``micro_batch_size`` samples (for gradient accumulation)."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        return [
            Batch(
                self.x[i : i + micro_batch_size],
                self.y[i : i + micro_batch_size],
                self.domain[i : i + micro_batch_size],
                self.domain_names,
            )
            for i in range(0, len(self), micro_batch_size)
        ]


def _windows(flat: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``block_size + 1`` bytes at each start with one fancy-index (no Python loop)."""
    idx = starts.unsqueeze(1) + torch.arange(block_size + 1, dtype=torch.long)
    win = flat[idx].long()
    return win[:, :-1], win[:, 1:]


class WindowSampler:
    """Deterministic infinite sampler of training windows from several domains.

    Each batch holds ``global_batch_size`` windows of ``block_size + 1`` bytes. Each sample's
    domain is drawn with the current mixture weights, then a uniform random start inside that
    domain's split. All randomness comes from one seeded ``torch.Generator``, so the stream of
    batches is a function of (seed, weights history) and can be checkpointed and restored with
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(
        self,
        domains: Mapping[str, torch.Tensor],
        block_size: int,
        global_batch_size: int,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not domains:
            raise ValueError("at least one domain is needed")
        self.domain_names: tuple[str, ...] = tuple(domains)
        self.block_size = int(block_size)
        self.split = split
        self.seed = int(seed)
        self.global_batch_size = global_batch_size
        parts = [split_domain(domains[name], split) for name in self.domain_names]
        for name, part in zip(self.domain_names, parts, strict=True):
            if len(part) < self.block_size + 1:
                raise ValueError(
                    f"domain {name!r} {split} split has {len(part)} bytes, fewer than block_size + 1"
                )
        # One flat buffer plus per-domain base offsets: a whole batch is then one gather.
        self._flat = torch.cat([p.reshape(-1) for p in parts])
        self._lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
        self._base = torch.cumsum(self._lengths, 0) - self._lengths
        self._n_starts = self._lengths - self.block_size  # valid starts per domain: [0, len - T - 1]
        self._generator = torch.Generator().manual_seed(self.seed)
        self._weights = torch.full((len(parts),), 1.0 / len(parts), dtype=torch.float64)
        if weights is not None:
            self.set_weights(weights)
        self.batches_drawn = 0
        self.samples_drawn = torch.zeros(len(parts), dtype=torch.long)

    @property
    def global_batch_size(self) -> int:
        """Samples per batch; may be changed between batches (e.g. by a policy)."""
        return self._global_batch_size

    @global_batch_size.setter
    def global_batch_size(self, value: int) -> None:
        if int(value) <= 0:
            raise ValueError(f"global_batch_size must be positive, got {value}")
        self._global_batch_size = int(value)

    def set_block_size(self, block_size: int) -> None:
        """Draw windows of `block_size` (+1) bytes from the next batch on: a sequence-length
        curriculum, or a long-context phase after a short one."""
        shortest = int(self._lengths.min())
        if not 0 < int(block_size) < shortest:
            raise ValueError(f"block_size must be in [1, {shortest - 1}] for this corpus, got {block_size}")
        self.block_size = int(block_size)
        self._n_starts = self._lengths - self.block_size

    @property
    def weights(self) -> dict[str, float]:
        """The current mixture weights, normalised to sum to 1."""
        return {n: float(w) for n, w in zip(self.domain_names, self._weights, strict=True)}

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set the mixture weights for the following batches.

        Keys must be known domain names; a domain left out gets weight 0. Weights must be finite
        and non-negative with a positive sum; they are normalised.
        """
        unknown = set(weights) - set(self.domain_names)
        if unknown:
            raise KeyError(f"unknown domains {sorted(unknown)}; known: {list(self.domain_names)}")
        w = torch.tensor([float(weights.get(n, 0.0)) for n in self.domain_names], dtype=torch.float64)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights must be finite and non-negative, got {dict(weights)}")
        total = float(w.sum())
        if total <= 0.0:
            raise ValueError(f"weights must have a positive sum, got {dict(weights)}")
        self._weights = w / total

    def next_batch(self) -> Batch:
        """Draw the next batch."""
        g = self._generator
        b = self._global_batch_size
        domain = torch.multinomial(self._weights, b, replacement=True, generator=g)
        # Uniform start in [0, n_starts) for each sample's own domain; float64 keeps every start
        # reachable for domains far beyond 2**24 bytes.
        u = torch.rand(b, generator=g, dtype=torch.float64)
        starts = (u * self._n_starts[domain].double()).long()
        x, y = _windows(self._flat, self._base[domain] + starts, self.block_size)
        self.batches_drawn += 1
        self.samples_drawn += torch.bincount(domain, minlength=len(self.domain_names))
        return Batch(x, y, domain, self.domain_names)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact same stream of batches."""
        return {
            "generator": self._generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "samples_drawn": self.samples_drawn.tolist(),
            "weights": self.weights,
            "global_batch_size": self._global_batch_size,
            "domain_names": list(self.domain_names),
            "block_size": self.block_size,
            "split": self.split,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (same domains and block size required)."""
        if tuple(state["domain_names"]) != self.domain_names:
            raise ValueError(
                f"state is for domains {state['domain_names']}, this sampler has {list(self.domain_names)}"
            )
        if int(state["block_size"]) != self.block_size or state["split"] != self.split:
            raise ValueError(
                f"state is for block_size={state['block_size']} split={state['split']!r}, this sampler "
                f"has block_size={self.block_size} split={self.split!r}"
            )
        self._generator.set_state(state["generator"].clone())
        self.set_weights(state["weights"])
        self.global_batch_size = int(state["global_batch_size"])
        self.batches_drawn = int(state["batches_drawn"])
        self.samples_drawn = torch.tensor(state["samples_drawn"], dtype=torch.long)
        self.seed = int(state["seed"])


def eval_batches(
    domains: Mapping[str, torch.Tensor],
    split: str = "val",
    *,
    block_size: int = 128,
    batch_size: int = 16,
    n_batches: int = 4,
    seed: int = 1234,
) -> dict[str, list[Batch]]:
    """Fixed evaluation windows: ``n_batches`` batches per domain, every window from that domain.

    Each domain has its own generator seeded from ``seed`` and the domain's name, so adding a
    domain leaves the other domains' windows unchanged. ``domain`` tags index ``tuple(domains)``.
    """
    names = tuple(domains)
    out: dict[str, list[Batch]] = {}
    for index, name in enumerate(names):
        part = split_domain(domains[name], split)
        n_starts = len(part) - block_size
        if n_starts <= 0:
            raise ValueError(
                f"domain {name!r} {split} split has {len(part)} bytes, fewer than block_size + 1"
            )
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        batches = []
        for _ in range(n_batches):
            starts = torch.randint(0, n_starts, (batch_size,), generator=g)
            x, y = _windows(part, starts, block_size)
            batches.append(Batch(x, y, torch.full((batch_size,), index, dtype=torch.long), names))
        out[name] = batches
    return out
