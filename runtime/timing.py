"""The durations the cycle model puts on the overlap rules of :mod:`flightllm.hw.isa`.

The golden model (:class:`flightllm.runtime.golden.Golden`) schedules every
instruction by the ISA's overlap rules; this module says how long each part takes.
Three kinds of number, each with its source:

* **Measured on the RTL**: ``mpe_latency``, the cycles from the last beat of a
  matrix-engine operation to its last result (fill and drain of the dequant units,
  chains and output FIFO), read from ``hw/mpe_timing.json``, which
  ``bench/rtl_efficiency.py`` writes from Verilator runs of the generated MPE. A
  preset without its own RTL runs takes the measurement of the preset with its
  per-channel geometry (:data:`RTL_PROXY`).
* **Published**: ``hbm_efficiency`` = 0.92, the sustained fraction of the U280's
  460 GB/s for sequential long-burst reads (about 425 GB/s: Shuhai, Wang et al.,
  FCCM 2020, arXiv 2005.04324; ``../shared/REFERENCES.md``); ``hbm_latency`` = 64 cycles
  at 225 MHz (~285 ns, the same paper's page-hit read latency through the AXI switch,
  rounded up).
* **Estimated until the RTL exists** (issue "SFU and buffers"): ``sfu_latency``, the
  pipeline depth of the float32 lanes (exp is the deepest path), and ``store_latency``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["Timing", "RTL_PROXY", "mpe_latency", "timing_for"]

_TIMING_FILE = Path(__file__).resolve().parent.parent / "hw" / "mpe_timing.json"

#: presets measured through another preset's RTL (same chains per channel and lanes)
RTL_PROXY = {"u280": "u280-2ch", "vhk158": "u280-2ch"}

#: used when no RTL measurement exists for a preset (the largest measured so far: 36)
DEFAULT_MPE_LATENCY = 36


def mpe_latency(preset: str) -> tuple:
    """``(cycles, source)`` of the MPE's fill and drain for ``preset``."""
    try:
        table = json.loads(_TIMING_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    for name in (preset, RTL_PROXY.get(preset)):
        if name and name in table:
            return int(round(table[name]["latency_cycles"])), f"RTL ({name}, {_TIMING_FILE.name})"
    return DEFAULT_MPE_LATENCY, "default (no RTL measurement)"


@dataclass(frozen=True)
class Timing:
    """Durations of the cycle model (cycles of the kernel clock unless named otherwise)."""

    hbm_efficiency: float = 0.92     #: sustained fraction of each channel's peak (published)
    hbm_latency: int = 64            #: first read data after a fetch starts
    mpe_latency: int = DEFAULT_MPE_LATENCY   #: last beat -> last result (RTL)
    sfu_latency: int = 32            #: last element in -> last result out (estimate)
    store_latency: int = 64          #: last write burst -> data in HBM (estimate)

    def __post_init__(self):
        if not 0 < self.hbm_efficiency <= 1:
            raise ValueError(f"hbm_efficiency must be in (0, 1], not {self.hbm_efficiency}")
        for f in ("hbm_latency", "mpe_latency", "sfu_latency", "store_latency"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0")

    def with_(self, **kw) -> "Timing":
        return replace(self, **kw)


def timing_for(params, **overrides) -> Timing:
    """The default :class:`Timing` of a build, its MPE latency from the RTL measurements."""
    lat, _ = mpe_latency(params.name)
    return Timing(mpe_latency=lat).with_(**overrides)
