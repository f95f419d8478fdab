"""Reproducible random streams: one CPU generator per (chip seed, layer, effect).

Every random number of a chip is drawn in float64 from a CPU generator, whatever
device the layer lives on: CPU generators give the same numbers on every machine
and every torch build, while CUDA's Philox streams differ from the CPU's (and a
chip must have the same devices on a laptop and on a GPU node). The draws are then
converted to the layer's dtype on the CPU and copied to its device without
blocking the host (:func:`on_device`).

A chip's *static* draws (d2d factors, stuck cells, drift exponents) are the same at
every read, so :func:`on_device` keeps them, already on the layer's device, in a small
cache keyed by (seed, layer, effect, shape, dtype, device). An evaluation chip with
read noise recomputes its effective weight at every read; with the cache only the
read noise is drawn again. Training draws a new chip per step, which misses the
cache (one CPU draw and one host-to-device copy per layer and step, no sync).
"""
from __future__ import annotations

import zlib
from collections import OrderedDict

import torch


def layer_generator(seed: int, name: str, salt: str = "") -> torch.Generator:
    """A CPU generator for one layer of one chip, stable across machines and runs.

    The layer's name is hashed with CRC32 (not Python's salted ``hash``) so that
    seeds mean the same thing in every process; ``salt`` separates the streams of
    different effects (``"d2d"``, ``"stuck"``, ``"drift"``, ``"read<n>"``, ...).
    """
    key = zlib.crc32(f"{name}|{salt}".encode())
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 0x9E3779B1 + key) % (2**63 - 1))
    return gen


class _DrawCache:
    """Least recently used draws on their target device, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._bytes = 0

    def get(self, key):
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
        return t

    def put(self, key, t: torch.Tensor) -> None:
        if t.nbytes > self.max_bytes:
            return
        self._items[key] = t
        self._bytes += t.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


# 256 MiB: the static draws of a few chips of a ResNet-sized network.
_CACHE = _DrawCache(max_bytes=256 * 1024 ** 2)


def draw(kind: str, shape, seed: int, name: str, salt: str) -> torch.Tensor:
    """float64 CPU draws (``"rand"``: uniform on [0, 1), ``"randn"``: standard normal)
    of one effect of one layer of one chip (:func:`layer_generator`)."""
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(tuple(shape), generator=layer_generator(seed, name, salt), dtype=torch.float64)


def on_device(make, *, dtype, device, key=None) -> torch.Tensor:
    """``make()`` (a float64 CPU tensor computed from draws) in ``dtype`` on ``device``.

    The result is converted on the CPU (half the bytes to copy in float32) and copied
    without blocking the host (a pageable buffer is staged by the driver at once, so
    the CPU tensor may be freed). With a ``key`` (a hashable naming everything the
    result depends on besides dtype and device) the result is kept for the next
    identical call; callers must not modify it in place.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    full_key = None if key is None else (key, dtype, device)
    if full_key is not None:
        hit = _CACHE.get(full_key)
        if hit is not None:
            return hit
    t = make().to(dtype=dtype)
    if device.type != "cpu":
        t = t.to(device=device, non_blocking=True)
    if full_key is not None:
        _CACHE.put(full_key, t)
    return t
