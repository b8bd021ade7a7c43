"""Helpers shared by the cocotb testbenches."""

from __future__ import annotations

__all__ = ["pauses"]


def pauses(rng, p: float, longest: int = 30):
    """A cocotbext-axi pause generator: each cycle paused with probability ``p``, and now and
    then (probability ``p / 8``) a run of 5 .. ``longest`` paused cycles (a busy memory)."""
    while True:
        if rng.random() < p / 8:
            for _ in range(rng.randint(5, longest)):
                yield True
        yield rng.random() < p
