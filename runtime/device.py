"""The Device protocol every backend implements, and its golden-model implementation.

A device holds one artifact's images and runs its programs::

    dev.load(artifact)                  # weight channels, tables, programs
    dev.write_tokens(pos, ids)          # token buffer (one id per sequence position)
    dev.write_reg("POS", p); dev.write_reg("LEN", n)    # AXI-Lite argument registers
    dev.start("prefill" | "prefill_last" | "decode"); stats = dev.wait()
    dev.read_logits(row, rows)          # float32 (rows, vocab) from the output region
    dev.read_reg("ARGMAX")

The same driver code (:mod:`flightllm.runtime.driver`) runs on every backend.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, runtime_checkable

import numpy as np

from ..compiler.artifact import Artifact, ArtifactError
from ..compiler.schedule import PROGRAM_FILES
from ..hw.isa import IsaError, Reg, decode_program
from ..hw.params import HwParams
from .golden import Golden, RunStats, set_blas_threads

__all__ = ["Device", "GoldenDevice", "open_device", "BACKENDS"]


@runtime_checkable
class Device(Protocol):
    params: HwParams

    def load(self, artifact: Artifact) -> None: ...
    def write_tokens(self, pos: int, ids) -> None: ...
    def write_reg(self, name: str, value: int) -> None: ...
    def read_reg(self, name: str) -> int: ...
    def start(self, program: str) -> None: ...
    def wait(self) -> RunStats: ...
    def read_logits(self, row: int, rows: int) -> np.ndarray: ...
    def has_program(self, name: str) -> bool: ...


#: programs an older artifact may lack (the driver falls back to ``prefill``)
OPTIONAL_PROGRAMS = ("prefill_last",)


def artifact_programs(art: Artifact) -> dict:
    """Decoded programs of an artifact (clear errors for missing or corrupt images)."""
    entry = art.manifest.get("programs")
    if not entry:
        raise ArtifactError(f"{art.path}: no instruction programs in the manifest "
                            "(compiled before the scheduler existed; recompile with `flightllm compile`)")
    progs = {}
    for name, rel in PROGRAM_FILES.items():
        if name in OPTIONAL_PROGRAMS and rel not in art.manifest.get("images", {}):
            continue                    # an artifact from before the program existed
        try:
            progs[name] = decode_program(art.read(rel), f"{art.path / rel}")
        except IsaError as e:
            raise ArtifactError(str(e)) from None
    return progs


class GoldenDevice:
    """The bit-exact golden model behind the Device protocol.

    ``params``: the hardware this device is (default: the artifact's). Loading an
    artifact built for different parameters is an error.
    """

    name = "golden"

    def __init__(self, params: HwParams | None = None, weight_cache: bool = True):
        self.params = params
        self.use_weight_cache = weight_cache
        set_blas_threads(int(os.environ.get("FLIGHTLLM_BLAS_THREADS", "1")))
        self.machine = None
        self._pending = None
        self.last_stats = None

    def load(self, artifact: Artifact) -> None:
        if self.params is not None and artifact.params != self.params:
            diff = [k for k, v in self.params.to_dict().items() if artifact.params.to_dict().get(k) != v]
            raise ArtifactError(f"{artifact.path}: built for hardware {artifact.params.name!r}, this golden "
                                f"device is {self.params.name!r} (differs in {', '.join(diff)})")
        self.params = artifact.params
        self.programs = artifact_programs(artifact)
        self.plan = artifact.manifest["programs"]["plan"]
        chans = [artifact.read(f"weights/ch{c:02d}.bin") for c in range(self.params.weight_channels)]
        tables = np.frombuffer(artifact.read("tables.bin"), dtype="<f4")
        cache = None
        if self.use_weight_cache:
            from .cli import cache_dir
            key = hashlib.sha256("".join(artifact.manifest["images"][f"weights/ch{c:02d}.bin"]["sha256"]
                                         for c in range(self.params.weight_channels)).encode()).hexdigest()[:16]
            cache = cache_dir() / "golden-weights" / key
        self.machine = Golden(self.params, chans, tables, self.plan, artifact.manifest["tensors"],
                              weight_cache=cache)
        self.tables_loaded = False          # the kernel loads the SFU tables on the first run
        self.max_seq = self.plan["max_seq"]

    def write_tokens(self, pos, ids):
        self.machine.write_tokens(pos, ids)

    def write_reg(self, name, value):
        if name not in ("POS", "LEN"):
            raise ValueError(f"register {name!r} is not host-writable (POS, LEN)")
        self.machine.regs[Reg[name].value] = int(value)

    def read_reg(self, name):
        return int(self.machine.regs[Reg[name].value])

    def has_program(self, name):
        return name in self.programs

    def start(self, program):
        if program not in self.programs:
            raise ValueError(f"no program {program!r}")
        self._pending = program

    def wait(self) -> RunStats:
        if self._pending is None:
            raise RuntimeError("wait() without start()")
        prog, self._pending = self.programs[self._pending], None
        self.last_stats = self.machine.run(prog, tables=not self.tables_loaded)
        self.tables_loaded = True
        return self.last_stats

    def read_logits(self, row, rows):
        return self.machine.read_out(row, rows)


def _rtl(params):
    from .rtl import RtlDevice          # cocotb and the simulator only when asked for
    return RtlDevice(params)


def _xrt(params):
    from .xrt import XrtDevice          # pyxrt only when asked for (XrtError if it is missing)
    return XrtDevice(params)


#: backend name -> constructor taking the hardware parameters (None: the artifact's)
BACKENDS = {"golden": GoldenDevice, "rtl": _rtl, "xrt": _xrt}


def open_device(backend: str, params: HwParams | None = None):
    try:
        make = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}") from None
    return make(params)
