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
* **Measured on the RTL**: ``sfu_latency`` (the SFU unit's last issue -> results in the
  buffers) and ``sfu_overhead``, per SFU opcode the cycles an operation keeps the unit
  busy beyond streaming its elements (the waits of its dependent passes for the lanes,
  the reductions, SQRT), as ``fixed + per_row x rows``; from ``hw/sfu_timing.json``, which
  ``bench/sfu_cycles.py`` fits to Verilator runs of the SFU unit on the buffers (the
  ``sim-sfu`` build, 8 lanes, for every preset: a wider build's sum tree takes
  ``lanes x slots / 2`` cycles per row, more than the 32 measured, so wide presets are
  optimistic there).
* **Measured on the RTL**: ``mpe_out_latency``, what the whole MPE unit
  (``hw/mpe_unit.py``) adds to the bare engine's ``mpe_latency``: its output lanes and
  buffer writes (MpeOutLane, 24 cycles, and ~6 of writes and control). From
  ``sim/test_mpe_unit.py::test_cycles`` (token -> results in the buffers, minus the
  engine's work, ``mpe_latency`` and :func:`act_cycles`): 29 on ``sim``, 30 on the u280's
  per-channel geometry (``u280-2ch``); that test checks the model's figure against its runs.
* **The RTL's structure**: :func:`act_cycles`, the MPE unit's loader reading a pass's
  activations from the buffers before the engine starts it, and :func:`tables_cycles`, the
  kernel loading the SFU tables before the first run after an artifact is loaded.
* **Estimated**: ``store_latency``; ``fetch_latency``, the start of a run to its first
  instruction dispatched, is the first read of the instruction fetch (``hbm_latency``; the
  kernel's decode takes a few cycles more, 32 in all against a zero-wait memory model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["Timing", "RTL_PROXY", "mpe_latency", "sfu_timing", "timing_for", "act_cycles", "tables_cycles"]

_TIMING_FILE = Path(__file__).resolve().parent.parent / "hw" / "mpe_timing.json"
_SFU_FILE = Path(__file__).resolve().parent.parent / "hw" / "sfu_timing.json"

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


def sfu_timing() -> tuple:
    """``(latency, overhead, source)`` of the SFU from the RTL measurements: ``overhead`` a
    tuple of ``(opcode name, fixed, per_row)``; ``(32, (), "estimate")`` without them."""
    try:
        t = json.loads(_SFU_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return 32, (), "estimate (no RTL measurement)"
    ovh = tuple((name, float(a), float(b)) for name, (a, b) in sorted(t["overhead"].items()))
    return int(t["latency_cycles"]), ovh, f"RTL ({t['params']}, {_SFU_FILE.name})"


@dataclass(frozen=True)
class Timing:
    """Durations of the cycle model (cycles of the kernel clock unless named otherwise)."""

    hbm_efficiency: float = 0.92     #: sustained fraction of each channel's peak (published)
    hbm_latency: int = 64            #: first read data after a fetch starts
    mpe_latency: int = DEFAULT_MPE_LATENCY   #: last beat -> last result (RTL)
    sfu_latency: int = 32            #: last element in -> results in the buffers (RTL)
    sfu_overhead: tuple = ()         #: (opcode, fixed, per_row) issue cycles beyond the elements (RTL)
    store_latency: int = 64          #: last write burst -> data in HBM (estimate)
    mpe_out_latency: int = 30        #: the MPE unit's output path beyond the engine (RTL)
    fetch_latency: int = 64          #: start -> first instruction dispatched (its fetch: hbm_latency)

    def __post_init__(self):
        if not 0 < self.hbm_efficiency <= 1:
            raise ValueError(f"hbm_efficiency must be in (0, 1], not {self.hbm_efficiency}")
        for f in ("hbm_latency", "mpe_latency", "sfu_latency", "store_latency", "mpe_out_latency",
                  "fetch_latency"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0")

    def with_(self, **kw) -> "Timing":
        return replace(self, **kw)


def act_cycles(params, tokens: int, k: int, group: int = 0) -> int:
    """Cycles the MPE unit's loader takes to read one pass's activations from the buffers:
    per token one scale read, ``k / min(chain_len, sfu_lanes)`` activation reads (an engine
    word, or its ``sfu_lanes``-wide parts) and, with group factors (``group`` elements per
    factor, 0 for none), one factor read per ``sfu_lanes`` groups (``hw/mpe_unit.py``,
    the loader). The engine starts a pass when its activations are in; the loader fills one
    half of the activation buffer while the engine runs the other, so only a pass that
    waited for its inputs exposes this."""
    per = -(-k // min(params.chain_len, params.sfu_lanes))
    if group:
        per += -(-k // (group * params.sfu_lanes))
    return tokens * (1 + per)


def tables_cycles(params, timing: "Timing", words: int) -> float:
    """Cycles of loading ``words`` float32 SFU table values over the instruction port
    (``hw/tables.py``: one port word of 4 values per beat) before the first run after an
    artifact is loaded."""
    from ..hw.isa import WORD_BITS
    if words <= 0:
        return 0.0
    return timing.hbm_latency + words / (WORD_BITS // 32) / timing.hbm_efficiency


def timing_for(params, **overrides) -> Timing:
    """The default :class:`Timing` of a build, its MPE latency from the RTL measurements."""
    lat, _ = mpe_latency(params.name)
    slat, sovh, _ = sfu_timing()
    return Timing(mpe_latency=lat, sfu_latency=slat, sfu_overhead=sovh).with_(**overrides)
