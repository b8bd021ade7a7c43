"""The host side of the kernel, register by register: shared by the ``rtl`` and ``xrt`` backends.

A :class:`KernelBus` is what a backend provides: 32-bit reads and writes of the
``s_axi_control`` registers, buffers in device memory per m_axi port, and a way to wait
for the kernel's interrupt. On top of it:

* :class:`KernelDriver` runs a program image register by register (the arguments of
  :mod:`flightllm.hw.regmap`, ``ap_start``, waiting for ``ap_done``, the status registers);
* :class:`KernelDevice` is the :class:`~flightllm.runtime.device.Device` protocol over a
  driver: it lays an artifact out in device memory as :mod:`flightllm.hw.memmap` says
  (weights and KV cache per channel, the LD/ST spaces and token buffer interleaved over the
  last ``kv_channels`` channels, the programs and the SFU tables in the ``instr`` buffer)
  and reads the logits and the KV state back.

A run that ends with a status other than OK raises :class:`KernelError` naming the status
and the instruction.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..compiler.artifact import Artifact, ArtifactError
from ..compiler.schedule import PROGRAM_FILES
from ..hw import regmap as R
from ..hw.isa import WORD_BYTES
from ..hw.memmap import GRANULE, PAGE, memory_map
from ..hw.params import HwParams
from ..hw.regmap import STATUS_DOC, Status, register_map
from .golden import RunStats

__all__ = ["KernelBus", "KernelDriver", "KernelDevice", "KernelError", "SCRATCH_BYTES"]

#: Room in the instr buffer for programs that are not the artifact's (tests, fuzzing).
SCRATCH_BYTES = 64 * 1024


class KernelError(RuntimeError):
    """A run the kernel ended with an error status."""

    def __init__(self, status: Status, pc: int, program: str = "program"):
        self.status, self.pc = status, pc
        super().__init__(f"{program}: the kernel ended the run with {status.name} at instruction {pc} "
                         f"({STATUS_DOC[status]})")


class KernelBus(Protocol):
    def write32(self, offset: int, value: int) -> None: ...
    def read32(self, offset: int) -> int: ...
    def alloc(self, port: str, size: int) -> int: ...                  # device address
    def write_mem(self, port: str, addr: int, data: bytes) -> None: ...
    def read_mem(self, port: str, addr: int, n: int) -> bytes: ...
    def wait_interrupt(self, max_cycles: int) -> bool: ...             # True: it came


class KernelDriver:
    """Register-level control of one kernel (the ap_ctrl_hs protocol, interrupt-driven)."""

    def __init__(self, bus: KernelBus, params: HwParams):
        self.bus, self.params = bus, params
        self.map = register_map(params)

    def set_args(self, **values) -> None:
        for off, word in self.map.arg_writes(values):
            self.bus.write32(off, word)

    def read(self, name: str) -> int:
        reg = self.map[name]
        return reg.decode([self.bus.read32(reg.offset + 4 * i) for i in range(reg.nwords)])

    def run(self, max_cycles: int = 1 << 26) -> dict:
        """Start a run with the arguments set, wait for its end; the status registers."""
        if not self.bus.read32(R.CTRL) & R.AP_IDLE:
            raise RuntimeError("the kernel is not idle (a run in progress)")
        self.bus.write32(R.GIER, R.GIE)                 # interrupt on ap_done
        self.bus.write32(R.IP_IER, R.IRQ_DONE)
        self.bus.write32(R.CTRL, R.AP_START)
        if not self.bus.wait_interrupt(max_cycles):
            raise TimeoutError(f"no ap_done within {max_cycles} cycles (the kernel's watchdog should have "
                               "ended the run: the kernel or the simulation is stuck)")
        ctrl = self.bus.read32(R.CTRL)                          # clears ap_done
        self.bus.write32(R.IP_ISR, self.bus.read32(R.IP_ISR))   # toggle-on-write: clear what is set
        if not ctrl & R.AP_DONE:
            raise RuntimeError(f"interrupt without ap_done (CTRL {ctrl:#x})")
        return {name: self.read(name) for name in ("status", "err_pc", "argmax", "cycles")}


class KernelDevice:
    """The Device protocol on a kernel behind a :class:`KernelBus` (module docstring)."""

    name = "kernel"

    def __init__(self, bus: KernelBus, params: HwParams):
        self.bus, self.params = bus, params
        self.drv = KernelDriver(bus, params)
        self.regs = {"POS": 0, "LEN": 0}
        self._pending = None
        self.last_status = None

    # -- loading --------------------------------------------------------------------
    def load(self, artifact: Artifact) -> None:
        from .device import artifact_programs
        if artifact.params != self.params:
            raise ArtifactError(f"{artifact.path}: built for hardware {artifact.params.name!r}, this kernel is "
                                f"{self.params.name!r}")
        p = self.params
        C = p.weight_channels
        self.plan = plan = artifact.manifest["programs"]["plan"]
        artifact_programs(artifact)                       # clear errors for corrupt images
        images = [artifact.read(f"weights/ch{c:02d}.bin") for c in range(C)]
        self.mm = mm = memory_map(p, plan, max(len(i) for i in images))
        # the instr buffer: each program at a page, a scratch area for other programs, the tables
        progs = {name: artifact.read(rel) for name, rel in PROGRAM_FILES.items()
                 if rel in artifact.manifest.get("images", {})}
        tables = artifact.read("tables.bin")
        off, self.prog = 0, {}
        for name, img in progs.items():
            self.prog[name] = (off, len(img) // WORD_BYTES)
            off = -(-(off + len(img)) // PAGE) * PAGE
        # the tables after every program (``tab_offset`` is an unsigned offset from a program)
        self.scratch_off = off
        self.tab_off, self.tab_words = off + SCRATCH_BYTES, len(tables) // 4
        # every buffer is allocated before anything is written (a simulation sizes its memories once)
        self.ch = [self.bus.alloc(f"ch{c:02d}", mm.channel_size(c)) for c in range(C)]
        self.instr = self.bus.alloc("instr", self.tab_off + len(tables))
        for c in range(C):
            self.bus.write_mem(f"ch{c:02d}", self.ch[c], images[c])
        for name, img in progs.items():
            self.bus.write_mem("instr", self.instr + self.prog[name][0], img)
        self.bus.write_mem("instr", self.instr + self.tab_off, tables)
        self.tables_loaded = False
        self.drv.set_args(**mm.args(), max_seq=plan["max_seq"], **{f"ch{c:02d}": self.ch[c] for c in range(C)})

    # -- the spaces (interleaved over the last kv_channels channels) -------------------
    def _space_io(self, space: str, addr: int, data: bytes | None = None, n: int = 0):
        out = bytearray()
        end = addr + (len(data) if data is not None else n)
        a = addr
        while a < end:
            g_end = min(end, (a // GRANULE + 1) * GRANULE)
            c, off = self.mm.locate(space, a)
            port = f"ch{c:02d}"
            if data is not None:
                self.bus.write_mem(port, self.ch[c] + off, data[a - addr:g_end - addr])
            else:
                out += self.bus.read_mem(port, self.ch[c] + off, g_end - a)
            a = g_end
        return bytes(out)

    def write_tokens(self, pos, ids):
        ids = np.asarray(ids, dtype="<i4")
        if pos < 0 or pos + ids.size > self.plan["max_seq"]:
            raise ValueError(f"token buffer: positions {pos}..{pos + ids.size - 1} beyond max_seq {self.plan['max_seq']}")
        self._space_io("TOK", 4 * pos, ids.tobytes())

    def write_reg(self, name, value):
        if name not in self.regs:
            raise ValueError(f"register {name!r} is not host-writable (POS, LEN)")
        self.regs[name] = int(value)

    def read_reg(self, name):
        if name in self.regs:
            return self.regs[name]
        if name == "ARGMAX":
            return self.drv.read("argmax")
        raise ValueError(f"register {name!r} cannot be read from the host")

    def has_program(self, name):
        return name in self.prog

    def start(self, program):
        if program not in self.prog:
            raise ValueError(f"no program {program!r}")
        self._pending = program

    def run_image(self, image_off: int, words: int, max_cycles: int = 1 << 26) -> dict:
        """Run the program image at ``image_off`` of the instr buffer (``words`` instructions)."""
        tab = 0 if self.tables_loaded else self.tab_words
        self.drv.set_args(pos=self.regs["POS"], len=self.regs["LEN"], prog_words=words,
                          instr=self.instr + image_off, tab_offset=self.tab_off - image_off, tab_words=tab)
        st = self.drv.run(max_cycles)
        self.tables_loaded = True
        self.last_status = st
        return st

    def run_program(self, image: bytes, max_cycles: int = 1 << 26) -> dict:
        """Run a program image that is not one of the artifact's (in the scratch area of the
        instr buffer); the status registers, whatever the status."""
        if len(image) > SCRATCH_BYTES or len(image) % WORD_BYTES:
            raise ValueError(f"a program image of {len(image)} bytes: at most {SCRATCH_BYTES}, whole "
                             f"{WORD_BYTES}-byte words")
        self.bus.write_mem("instr", self.instr + self.scratch_off, image)
        return self.run_image(self.scratch_off, len(image) // WORD_BYTES, max_cycles)

    def wait(self) -> RunStats:
        if self._pending is None:
            raise RuntimeError("wait() without start()")
        name, self._pending = self._pending, None
        off, words = self.prog[name]
        st = self.run_image(off, words)
        status = Status(st["status"])
        if status != Status.OK:
            raise KernelError(status, st["err_pc"], name)
        return RunStats(cycles=st["cycles"])

    def read_logits(self, row, rows):
        rb = self.plan["out_row_bytes"]
        b = self._space_io("OUT", row * rb, n=rows * rb)
        return np.frombuffer(b, "<f4").reshape(rows, rb // 4).copy()

    def read_kv(self) -> tuple[list, bytes]:
        """The KV state: each channel's KV cache bytes, and space KV."""
        mm = self.mm
        n = self.plan.get("kv_channel_bytes", 0)
        vals = [self.bus.read_mem(f"ch{c:02d}", self.ch[c] + mm.kv_base, n) for c in range(self.params.weight_channels)]
        return vals, self._space_io("KV", 0, n=self.plan.get("kv_bytes", 0))
