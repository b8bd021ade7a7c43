"""The kernel's register map: the one definition of every ``s_axi_control`` offset.

The RTL control slave (:class:`flightllm.hw.axil.ControlSlave`), the host register
driver (cocotb and XRT backends) and the kernel packaging (``package_xo`` Tcl) all take
their offsets, widths and m_axi port names from :func:`register_map`; nothing else
writes an offset. ``docs/regmap.md`` is generated from it
(``python -m flightllm.hw.regmap docs/regmap.md``).

Layout (the Vitis HLS / ``ap_ctrl_hs`` convention)
---------------------------------------------------
``0x00`` CTRL, ``0x04`` GIER, ``0x08`` IP_IER, ``0x0C`` IP_ISR (the bits below), then the
kernel arguments from ``0x10`` in order, as Vitis HLS lays out an ``s_axilite`` bundle:
a 32-bit scalar takes 8 bytes (its data word, a reserved word), a 64-bit pointer 12 bytes
(low word, high word, a reserved word), so consecutive pointers sit 12 bytes apart
(``0x10, 0x1C, 0x28``, as in the Vitis_Accel_Examples RTL kernels). The device-written
status registers follow the arguments with the same strides. The slave's address is
``addr_bits`` wide: the smallest width covering the map, at least 12 (a 4 KiB window,
what the Vitis RTL kernel examples use).

Control bits
------------
CTRL: bit 0 ``ap_start`` (host writes 1 to start a run while ``ap_idle``; reads 1 until
the run ends), bit 1 ``ap_done`` (set when a run ends, cleared when CTRL is read), bit 2
``ap_idle`` (1 at reset and after a run, 0 while running), bit 3 ``ap_ready`` (with
``ap_done``: the kernel takes its arguments for the whole run; clear on read), bit 7
``auto_restart`` (host read/write: a run that ends starts the next at once). GIER bit 0
enables the ``interrupt`` output; IP_IER bit 0 (done) and bit 1 (ready) enable the
interrupt sources; IP_ISR has the same bits, set by the event when enabled and toggled
by writing 1 (the host clears a set bit by writing 1 to it).

Arguments
---------
In order: ``pos``, ``len`` (the ISA's POS and LEN registers), ``prog_words``,
``watchdog`` (0: :data:`WATCHDOG_DEFAULT`), ``kv_space``, ``out_space``, ``tok_space``, ``max_seq``,
``tab_offset``, ``tab_words`` (the SFU tables, loaded from the instr buffer before the
program when ``tab_words`` is not 0),
then the pointers ``instr`` (m_axi port ``instr``) and ``ch00`` .. ``ch<C-1>`` (one
m_axi port per weight channel, ``C = weight_channels``).

Status registers (read-only)
----------------------------
``status`` (a :class:`Status` code), ``err_pc``, ``argmax`` (the ISA's ARGMAX register)
come from the kernel's control block (:meth:`RegisterMap.status_layout`); ``cycles``
(cycles of the last run, from its start to its done) is counted by the control slave
itself (:data:`SLAVE_COUNTED`), which sees both events.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from amaranth.lib import data, enum

from .isa import Reg
from .params import HwParams

__all__ = ["Register", "RegisterMap", "register_map", "Status", "STATUS_DOC", "UnknownRegister",
           "CTRL", "GIER", "IP_IER", "IP_ISR", "ARGS_BASE", "MIN_ADDR_BITS", "DATA_BITS",
           "AP_START", "AP_DONE", "AP_IDLE", "AP_READY", "AUTO_RESTART", "GIE", "IRQ_DONE", "IRQ_READY",
           "WATCHDOG_DEFAULT", "SLAVE_COUNTED", "ISA_REG", "markdown_doc", "write_doc"]

# -- the ap_ctrl_hs block -------------------------------------------------------------
CTRL = 0x00        #: control: ap_start, ap_done, ap_idle, ap_ready, auto_restart
GIER = 0x04        #: global interrupt enable (bit 0)
IP_IER = 0x08      #: IP interrupt enable (bit 0 done, bit 1 ready)
IP_ISR = 0x0C      #: IP interrupt status (bit 0 done, bit 1 ready; toggle on write)
ARGS_BASE = 0x10   #: first kernel argument

AP_START = 1 << 0      #: CTRL: start a run (read: 1 until the run ends)
AP_DONE = 1 << 1       #: CTRL: the run has ended (clear on read)
AP_IDLE = 1 << 2       #: CTRL: no run in progress
AP_READY = 1 << 3      #: CTRL: the kernel has taken its arguments (with ap_done; clear on read)
AUTO_RESTART = 1 << 7  #: CTRL: start the next run when one ends
GIE = 1 << 0           #: GIER: interrupt output enabled
IRQ_DONE = 1 << 0      #: IP_IER / IP_ISR: ap_done
IRQ_READY = 1 << 1     #: IP_IER / IP_ISR: ap_ready

DATA_BITS = 32         #: AXI4-Lite data width
MIN_ADDR_BITS = 12     #: smallest s_axi_control address width (a 4 KiB window, as Vitis RTL kernels)

#: Cycles without progress before a run is abandoned with :attr:`Status.WATCHDOG`, when the
#: ``watchdog`` argument is 0.
WATCHDOG_DEFAULT = 1 << 24

#: Status registers the control slave drives itself (not part of :meth:`RegisterMap.status_layout`).
SLAVE_COUNTED = frozenset({"cycles"})

#: Registers of the ISA (:class:`~flightllm.hw.isa.Reg`) that the register map carries.
ISA_REG = {"pos": Reg.POS, "len": Reg.LEN, "argmax": Reg.ARGMAX}

_STRIDE = {32: 8, 64: 12}        # bytes a scalar / pointer takes: data words + one reserved word


class Status(enum.Enum, shape=8):
    """How a run ended (the ``status`` register); shared by the RTL and the host
    (:data:`STATUS_DOC` says what each means)."""
    OK = 0
    ILLEGAL_OPCODE = 1
    DEADLOCK = 2
    UNBALANCED_TOKENS = 3
    LOOP_ERROR = 4
    PAST_END = 5
    WATCHDOG = 6
    BAD_FIELD = 7


#: What each :class:`Status` means (docs and host error messages).
STATUS_DOC = {
    Status.OK: "the run reached END",
    Status.ILLEGAL_OPCODE: "an opcode the decoder does not know",
    Status.DEADLOCK: "an instruction waits for a token that no earlier instruction signals",
    Status.UNBALANCED_TOKENS: "tokens left in a FIFO at a barrier (LOOP, a loop's back edge, END)",
    Status.LOOP_ERROR: "a loop body past its enclosing block, or loops nested deeper than LOOP_DEPTH",
    Status.PAST_END: "no END within prog_words instructions",
    Status.WATCHDOG: "no progress for watchdog cycles",
    Status.BAD_FIELD: "a unit rejected a field of an instruction",
}


class UnknownRegister(KeyError, ValueError):
    """A register name the map does not have (both a ``KeyError`` and a ``ValueError``)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Register:
    """One register of the map.

    Parameters
    ----------
    name : str
        ``CTRL``, ``GIER``, ``IP_IER``, ``IP_ISR``, an argument or a status register.
    offset : int
        Byte offset of its low data word.
    bits : int
        Data width: 32 or 64 (two words, low first).
    access : str
        ``'ctrl'`` (the ap_ctrl_hs block), ``'rw'`` (host-written argument, read back
        allowed) or ``'ro'`` (device-written status).
    kind : str
        ``'scalar'``, ``'pointer'`` (a 64-bit device address of an m_axi port's buffer) or
        ``'status'``.
    port : str or None
        The m_axi port a pointer addresses (``None`` otherwise).
    doc : str
        One line for the docs and the packaging.
    """
    name: str
    offset: int
    bits: int
    access: str
    kind: str
    port: str | None
    doc: str

    @property
    def nwords(self) -> int:
        """32-bit data words."""
        return self.bits // DATA_BITS

    @property
    def size(self) -> int:
        """Bytes of the map it occupies (its data words and its reserved word)."""
        return _STRIDE[self.bits] if self.access != "ctrl" else 4

    @property
    def end(self) -> int:
        """First byte offset after it."""
        return self.offset + self.size

    def check(self, value) -> int:
        """``value`` as an int in ``[0, 2**bits)``; ``ValueError`` naming the register otherwise."""
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                import numpy as np
                if isinstance(value, np.integer):
                    value = int(value)
            except ImportError:       # pragma: no cover
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"register {self.name!r}: value must be an int, not {value!r}")
        if not 0 <= value < (1 << self.bits):
            raise ValueError(f"register {self.name!r} is {self.bits} bits: value {value} out of range "
                             f"[0, 2**{self.bits})")
        return value

    def encode(self, value) -> list:
        """``[(offset, word), ...]``: the 32-bit words that write ``value`` (low word first)."""
        value = self.check(value)
        return [(self.offset + 4 * k, (value >> (32 * k)) & 0xFFFFFFFF) for k in range(self.nwords)]

    def decode(self, words) -> int:
        """The value of the register from its data words (low word first)."""
        words = list(words)
        if len(words) != self.nwords:
            raise ValueError(f"register {self.name!r} has {self.nwords} word(s), got {len(words)}")
        v = 0
        for k, w in enumerate(words):
            if not 0 <= int(w) < 1 << 32:
                raise ValueError(f"register {self.name!r}: word {k} = {w} is not a 32-bit value")
            v |= int(w) << (32 * k)
        return v


class _ByName(Mapping):
    def __init__(self, regs, what):
        self._d = {r.name: r for r in regs}
        self._what = what

    def __getitem__(self, name):
        try:
            return self._d[name]
        except (KeyError, TypeError):
            raise UnknownRegister(f"unknown register {name!r} in the {self._what}; "
                                  f"known: {', '.join(self._d)}") from None

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


class RegisterMap:
    """The ``s_axi_control`` register map of one build (module docstring).

    Parameters
    ----------
    params : HwParams
        ``weight_channels`` gives the pointer arguments ``ch00`` ..; the rest of the map
        does not depend on the parameters.

    Attributes
    ----------
    params : HwParams
    registers : tuple of Register
        Every register, by offset.
    by_name : Mapping of str to Register
        Lookup; an unknown name raises :class:`UnknownRegister` (a ``ValueError``).
    args : tuple of Register
        The host-written kernel arguments, in order.
    status : tuple of Register
        The device-written status registers, in order.
    ctrl : tuple of Register
        CTRL, GIER, IP_IER, IP_ISR.
    end : int
        First byte offset after the map.
    addr_bits : int
        Width of the AXI4-Lite address: ``max(MIN_ADDR_BITS, bits to address end - 1)``.
    """

    def __init__(self, params: HwParams):
        if not isinstance(params, HwParams):
            raise TypeError(f"RegisterMap needs HwParams, not {type(params).__name__}")
        self.params = params
        C = params.weight_channels
        ctrl = (
            Register("CTRL", CTRL, 32, "ctrl", "scalar", None,
                     "bit 0 ap_start, 1 ap_done (clear on read), 2 ap_idle, 3 ap_ready (clear on read), "
                     "7 auto_restart"),
            Register("GIER", GIER, 32, "ctrl", "scalar", None, "bit 0: global interrupt enable"),
            Register("IP_IER", IP_IER, 32, "ctrl", "scalar", None, "bit 0: done, bit 1: ready interrupt enable"),
            Register("IP_ISR", IP_ISR, 32, "ctrl", "scalar", None,
                     "bit 0: done, bit 1: ready interrupt status (toggle on write)"),
        )
        scalars = (
            ("pos", "POS register: position of the first token of this run"),
            ("len", "LEN register: tokens in this run"),
            ("prog_words", "instructions in the program image (running past them ends the run with PAST_END)"),
            ("watchdog", f"cycles without progress before the run ends with WATCHDOG (0: {WATCHDOG_DEFAULT})"),
            ("kv_space", f"byte offset of LD/ST space KV in each of the last {params.kv_channels} channel "
                         f"buffer(s) (64-byte granules interleaved over them)"),
            ("out_space", "byte offset of LD/ST space OUT (the logits) in the same channel buffers"),
            ("tok_space", "byte offset of the token buffer in the same channel buffers"),
            ("max_seq", "positions the token buffer holds (the artifact's max_seq): EMBED beyond them faults"),
            ("tab_offset", "byte offset of the SFU tables image (float32) in the instr buffer"),
            ("tab_words", "float32 words of the tables to load into the on-chip tables before the program "
                          "(0: keep the tables loaded by an earlier run)"),
        )
        pointers = [("instr", "instr", "device address of the program image (m_axi instr)")]
        pointers += [(f"ch{c:02d}", f"ch{c:02d}", f"device address of weight channel {c}'s buffer "
                                                  f"(m_axi ch{c:02d}, HBM pseudo-channel)")
                     for c in range(C)]
        off = ARGS_BASE
        args = []
        for name, doc in scalars:
            args.append(Register(name, off, 32, "rw", "scalar", None, doc))
            off += _STRIDE[32]
        for name, port, doc in pointers:
            args.append(Register(name, off, 64, "rw", "pointer", port, doc))
            off += _STRIDE[64]
        status = []
        for name, bits, doc in (
                ("status", 32, "how the last run ended: a Status code (0 OK)"),
                ("err_pc", 32, "instruction index of the fault (status != OK)"),
                ("argmax", 32, "ARGMAX register: argmax of the last logits row"),
                ("cycles", 64, "cycles of the last run, from its start to its done")):
            status.append(Register(name, off, bits, "ro", "status", None, doc))
            off += _STRIDE[bits]
        self.ctrl = ctrl
        self.args = tuple(args)
        self.status = tuple(status)
        self.registers = ctrl + self.args + self.status
        self.by_name = _ByName(self.registers, f"register map of {params.name!r}")
        self.end = off
        self.addr_bits = max(MIN_ADDR_BITS, (self.end - 1).bit_length())
        self._check()

    def _check(self):
        regs = sorted(self.registers, key=lambda r: r.offset)
        for a, b in zip(regs, regs[1:]):
            assert a.end <= b.offset, (a, b)
        assert len(self.by_name) == len(self.registers)

    def __getitem__(self, name) -> Register:
        return self.by_name[name]

    def __repr__(self):
        return f"RegisterMap({self.params.name!r}: {len(self.args)} args, end 0x{self.end:X}, " \
               f"addr_bits {self.addr_bits})"

    @property
    def pointers(self) -> tuple:
        """The pointer arguments (one per m_axi port), in order."""
        return tuple(r for r in self.args if r.kind == "pointer")

    @property
    def ports(self) -> tuple:
        """The m_axi port names, in argument order."""
        return tuple(r.port for r in self.pointers)

    def words(self) -> list:
        """``[(offset, name, word index), ...]``: every 32-bit data word of the map, by offset
        (word 0 is a 64-bit register's low word). Reserved words are not listed (they read 0)."""
        return [(r.offset + 4 * k, r.name, k) for r in self.registers for k in range(r.nwords)]

    def args_layout(self) -> data.StructLayout:
        """A field per argument at its width, in order (the control slave's ``args`` output)."""
        return data.StructLayout({r.name: r.bits for r in self.args})

    def status_layout(self) -> data.StructLayout:
        """The status registers the kernel's control block drives (all but :data:`SLAVE_COUNTED`):
        ``status`` as a :class:`Status`, the others at their width."""
        return data.StructLayout({r.name: (Status if r.name == "status" else r.bits)
                                  for r in self.status if r.name not in SLAVE_COUNTED})

    def arg_writes(self, values: Mapping) -> list:
        """``[(offset, word), ...]``: the writes that set the arguments in ``values`` (name ->
        int), in map order. ``ValueError`` for an unknown name, a status or control register,
        or a value out of range."""
        for name in values:
            r = self.by_name[name]
            if r.access != "rw":
                raise ValueError(f"register {name!r} is not a kernel argument (access {r.access!r}); "
                                 f"arguments: {', '.join(a.name for a in self.args)}")
        out = []
        for r in self.args:
            if r.name in values:
                out.extend(r.encode(values[r.name]))
        return out

    def markdown_table(self) -> str:
        """The map as a Markdown table (offset, name, bits, access, kind, m_axi port, meaning)."""
        lines = ["| offset | name | bits | access | kind | m_axi port | meaning |", "|---|---|---|---|---|---|---|"]
        for r in self.registers:
            span = f"0x{r.offset:03X}" if r.size == 4 else f"0x{r.offset:03X}-0x{r.end - 1:03X}"
            lines.append(f"| {span} | `{r.name}` | {r.bits} | {r.access} | {r.kind} | {r.port or ''} | {r.doc} |")
        return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def register_map(params: HwParams) -> RegisterMap:
    """The :class:`RegisterMap` of ``params`` (one object per parameter set)."""
    if not isinstance(params, HwParams):
        raise TypeError(f"register_map needs HwParams, not {type(params).__name__}")
    return RegisterMap(params)


DOC_INTRO = """# flightllm kernel register map (`s_axi_control`)

Generated by `python -m flightllm.hw.regmap docs/regmap.md` from `hw/regmap.py` (do not
edit by hand). The RTL control slave (`hw/axil.py`), the host register driver and the
kernel packaging all take their offsets from that module. The table below is the
`{preset}` preset's map ({nch} weight channels); other presets differ only in the number
of `chNN` pointers, which moves the status registers.

* Strides as Vitis HLS lays out an `s_axilite` bundle: a 32-bit scalar takes 8 bytes
  (data word, reserved word), a 64-bit pointer 12 bytes (low word, high word, reserved
  word). Reserved words and unmapped addresses read 0; writes to them, and to the
  read-only status registers, are ignored (OKAY response). Writes honour `WSTRB`.
* Address width `addr_bits` = {addr_bits} (map end 0x{end:X}; at least {min_bits}, a 4 KiB window).

## ap_ctrl_hs

| register | bit | name | behaviour |
|---|---|---|---|
| CTRL 0x00 | 0 | ap_start | host writes 1 while ap_idle: a run starts (a write while running is ignored); reads 1 until the run ends (with auto_restart: until a run ends with auto_restart clear) |
| CTRL 0x00 | 1 | ap_done | set when a run ends; cleared when CTRL is read, and by a host start |
| CTRL 0x00 | 2 | ap_idle | 1 at reset and after a run, 0 while running |
| CTRL 0x00 | 3 | ap_ready | set with ap_done (the kernel holds its arguments for the whole run); cleared like ap_done |
| CTRL 0x00 | 7 | auto_restart | host read/write: a run that ends starts the next one at once |
| GIER 0x04 | 0 | GIE | the `interrupt` output is `GIE & |(IP_ISR & IP_IER)` (registered) |
| IP_IER 0x08 | 0, 1 | done, ready | enable the interrupt sources |
| IP_ISR 0x0C | 0, 1 | done, ready | set at the end of a run if enabled; writing 1 toggles a bit (the host clears it so) |

The kernel arguments are sampled by the kernel at the start of a run; the host must not
change them while it runs. `cycles` counts the cycles from the kernel's start pulse to
its done (the slave counts them); `status`, `err_pc` and `argmax` are live values of the
kernel's control block, final once ap_done is set.

## Status codes (`status`)

{status}

## Registers

"""


def markdown_doc(params: HwParams) -> str:
    """``docs/regmap.md`` for ``params``."""
    rm = register_map(params)
    status = "\n".join(f"- {s.value} `{s.name}`: {STATUS_DOC[s]}" for s in Status)
    return DOC_INTRO.format(preset=params.name, nch=params.weight_channels, addr_bits=rm.addr_bits, end=rm.end,
                            min_bits=MIN_ADDR_BITS, status=status) + rm.markdown_table()


def write_doc(path, preset: str = "u280") -> None:
    from pathlib import Path

    from .params import get_preset
    Path(path).write_text(markdown_doc(get_preset(preset)), encoding="utf-8")


def main(argv=None) -> None:
    """``python -m flightllm.hw.regmap [docs/regmap.md [preset]]``: write the map's doc."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    write_doc(argv[0] if argv else "docs/regmap.md", argv[1] if len(argv) > 1 else "u280")


if __name__ == "__main__":
    main()
