"""Reproducible random streams: one CPU generator per (chip seed, layer, effect)."""
from __future__ import annotations

import zlib

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
