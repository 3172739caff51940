"""Fuzz input shared by the decoder tests: random byte strings and mutations of a good frame."""

from __future__ import annotations

import random
from collections.abc import Iterator


def variants(good: bytes, count: int, seed: int, max_random: int = 64) -> Iterator[bytes]:
    """``count`` byte strings, alternately random (0..max_random bytes) and ``good`` with 1-3
    bytes replaced; the same ``seed`` gives the same sequence."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 2:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, max_random)))
            continue
        mutated = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        yield bytes(mutated)
