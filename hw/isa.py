"""The instruction set: opcodes, instruction formats and their binary encoding.

One definition for everyone: the RTL decoder uses the :mod:`amaranth.lib.data`
layouts below directly (``Signal(FORMATS[Opcode.MV])`` views a fetched word), the
compiler encodes with them and the golden model decodes with them. ``docs/isa.md``
is generated from these layouts (:func:`markdown_table`).

Word
----
Every instruction is one ``WORD_BITS`` (128) bit word, stored little-endian
(16 bytes) in the instruction image. Every format begins with the same
:class:`Header` in bits ``[0, 14)``: the opcode in the low 6 bits, then the
dependency-token masks. A program image is the words back to back; it ends with
``END``.

Units and dependency tokens
---------------------------
Each opcode executes on one unit (:data:`UNIT_OF`): ``LD`` (HBM -> on-chip
buffers: the KV cache's scales, embedding rows), ``ST`` (on-chip -> HBM: KV cache
values and scales, logits), ``MPE`` (matrix engine: MV, MM, QK, PV) and ``SFU``
(special functions); ``SYS`` instructions (loops, register arithmetic, END) run in
the dispatcher. The dispatcher issues instructions in program order into one
in-order queue per unit, reading every register field (``*_reg``, ``preg``) as it
enqueues, so a queued instruction no longer depends on the registers. Between every
ordered pair of units (P, U) there is a token FIFO. An instruction of unit U with bit
P set in ``wait`` pops one token from FIFO (P->U) before it starts (it blocks until
one is there); with bit C set in ``signal`` it pushes one token into FIFO (U->C) when
it *completes* (its results are in the buffers or in HBM). A token must be signalled
by an instruction earlier in program order than the one that waits for it; a wait
that no earlier instruction can satisfy is a deadlock (the golden model raises).

Overlap rules (what the dispatcher and units do; the golden model's cycle model is
exactly these rules, with the durations of :mod:`flightllm.runtime.timing`)
----------------------------------------------------------------------------------
1. **Units pipeline their own instructions.** A unit starts its next instruction when
   it has *issued* the previous one (MPE: its last beat entered the chains; SFU: its
   last element entered the lanes; LD/ST: its last burst was requested); results come
   out a pipeline latency later. A unit's scoreboard holds an instruction that reads
   a buffer an earlier, still incomplete instruction *of the same unit* writes until
   that one completes (an SFU op reading the previous op's output waits for it;
   independent ops follow back to back). Across units only tokens order accesses.
2. **The matrix engine's operand streams run ahead.** Every MPE instruction (MV, MM,
   QK, PV) has two phases. Its *fetch*: the weight streamers read its records (a
   weight tensor, or a kv head's K or V cache region) from every weight channel into
   per-channel FIFOs of ``stream_fifo_beats`` words, in MPE program order, as soon as
   the previous fetch is done and the FIFOs have room. Its *compute*: the beats enter
   the chains as they arrive. Tokens from LD or ST gate the fetch (the streamed data
   was written by a store); tokens from SFU (and MPE) gate the compute (the
   activations). So weights stream ahead of compute through the FIFOs, whatever the
   SFU is doing, as long as they have room.
3. **HBM is shared.** The streamers, LD and ST use the same pseudo-channels; a load or
   store delays the streams by the time its bytes take.
4. **Barriers** are ``LOOP`` (entry), the back edge of each loop iteration and ``END``:
   the dispatcher waits until every unit has completed everything, and every token
   FIFO must then be empty (the compiler balances tokens inside each straight-line
   region). The decode program has no loops; the prefill programs' chunk loop is the
   only barrier inside a run (prefill is compute-bound: ``docs/perf.md`` gives its cost).

Registers and runtime-patched fields
------------------------------------
16 registers of 32 bits (:class:`Reg`). ``ZERO`` reads 0. ``POS`` (position of
the first token of this run) and ``LEN`` (tokens in this run) are written by the
host through the AXI-Lite control registers before ``start``; ``ARGMAX`` is
written by the ``ARGMAX`` instruction and read back by the host. The others are
scratch registers of the program (``SETR``) and loop indices (``LOOP``).
Fields named ``*_reg`` read a register at issue time: ``rows_reg`` gives the
number of token rows an operation covers, ``pos_reg`` a sequence position, and
the patch pair ``(preg, pmul)`` adds ``R[preg] * pmul`` to the operation's base
address / element offset. Thus one program serves every position and length.

Loops
-----
``LOOP idx, count_reg, add, shr, body``: ``count = max(0, R[count_reg] + add) >> shr``;
the ``body`` instructions that follow run ``count`` times with ``R[idx]`` = 0, 1,
... (zero trips skip the body). Loops nest (the RTL keeps a stack of
``LOOP_DEPTH``).
"""



import struct
from dataclasses import dataclass, field

from amaranth import signed, unsigned
from amaranth.lib import data, enum

__all__ = ["WORD_BITS", "WORD_BYTES", "LOOP_DEPTH", "Opcode", "Unit", "Reg", "Buf", "PER_HEAD", "Space",
           "Header", "FORMATS", "UNIT_OF", "Instr", "IsaError", "encode", "decode",
           "encode_program", "decode_program", "encode_slow", "decode_slow", "disasm",
           "markdown_table", "f32_bits", "bits_f32", "FLOAT_FIELDS", "NO_LIMIT", "REG_FIELDS", "MAX_REG_FIELDS",
           "reg_values", "setr_value", "loop_trips", "REG_BITS"]

WORD_BITS = 128
WORD_BYTES = WORD_BITS // 8
LOOP_DEPTH = 4
NO_LIMIT = 0xFFFFFFFF
REG_BITS = 32


class IsaError(ValueError):
    """An instruction or program image that cannot be decoded or encoded."""


class Opcode(enum.Enum, shape=6):
    NOP = 0
    END = 1
    LOOP = 2        #: hardware loop, trip count from a register
    SETR = 3        #: register arithmetic: R[rd] = min(R[rb] + R[ra]*mul + add, lim)
    LD_KV = 8       #: HBM KV space -> on-chip float32 rows (the KV cache's scales)
    EMBED = 9       #: gather embedding rows by token id from the weight channels, dequantize
    ST_KV = 12      #: the per-segment float32 scales of int8 rows -> HBM KV space
    ST_OUT = 13     #: on-chip float32 rows (logits) -> HBM output region
    ST_KT = 14      #: int8 K or V rows -> the KV cache's raw tensors in the weight channels
    MV = 16         #: matrix engine, one activation vector (decode)
    MM = 17         #: matrix engine, rows_reg activation vectors (prefill)
    QK = 18         #: attention scores of one kv head: int8 queries x the streamed K cache
    PV = 19         #: attention output of one kv head: int8 probabilities x the streamed V cache
    RMSNORM = 24
    ROPE = 25
    SOFTMAX = 26    #: one kv head's scores -> int8 probabilities for PV (normaliser folded in)
    SILU_MUL = 27
    ADD = 28
    QUANT = 29      #: requantize float32 -> int8 (levels +-imm) with one scale per segment (KV cache, queries)
    DEQUANT = 30
    ARGMAX = 32
    FILL = 33       #: set a float32 buffer to a constant
    QUANTG = 34     #: requantize float32 -> int8 for the matrix engine: a scale per row, a factor per group


class Unit(enum.Enum, shape=3):
    LD = 0
    ST = 1
    MPE = 2
    SFU = 3
    SYS = 4


TOKEN_UNITS = (Unit.LD, Unit.ST, Unit.MPE, Unit.SFU)   #: bit i of wait/signal is unit i


class Reg(enum.Enum, shape=4):
    ZERO = 0
    POS = 1        #: host: position of the first token of this run
    LEN = 2        #: host: tokens in this run
    ARGMAX = 3     #: device -> host: argmax of the last logits row
    CPOS = 4       #: program: first position of the current chunk
    CLEN = 5       #: program: tokens in the current chunk
    KVLEN = 6      #: program: positions attended to by the chunk's last token
    CHUNK = 7      #: program: chunk loop index
    TILE = 8       #: program: KV tile loop index
    OUTROW = 9     #: program: first logits row of the chunk
    R10 = 10
    R11 = 11
    R12 = 12
    R13 = 13
    R14 = 14
    R15 = 15


class Buf(enum.Enum, shape=5):
    """On-chip buffers. Float32 buffers hold rows x elements; int8 buffers also hold
    one float32 scale per segment of each row."""
    X = 0          #: residual stream (float32, rows x hidden)
    H = 1          #: normalised activations (float32)
    HQ = 2         #: int8 input of the next MV/MM (rows x up to ffn, + scale)
    Q = 3          #: float32 query
    K = 4          #: float32 key (new positions)
    V = 5          #: float32 value (new positions)
    QQ = 6         #: int8 query, one scale per head
    KQ = 7         #: int8 key rows to store, one scale per kv head
    VQ = 8         #: int8 value rows to store
    KS = 9         #: float32 key scales (max_seq rows x kv_heads), loaded by LD_KV
    S = 10         #: float32 attention scores (rows x heads x max_seq)
    A = 11         #: float32 attention output (rows x hidden)
    G = 12         #: float32 gate projection (rows x ffn)
    U = 13         #: float32 up projection
    Y = 14         #: float32 matrix-engine output before a residual add
    LOG = 15       #: float32 logits (rows x vocab)
    VS = 16        #: float32 value scales (max_seq rows x kv_heads), loaded by LD_KV
    PQ = 17        #: int8 probabilities (rows x heads x max_seq), a scale per (row, head), a factor per 32


#: Buffers attention uses one kv head at a time (QK writes S, SOFTMAX writes PQ, PV writes A,
#: each only its kv head's part): the head parts are independent of each other; a
#: whole-buffer access touches every part.
PER_HEAD = (Buf.S, Buf.PQ, Buf.A)


class Space(enum.Enum, shape=2):
    """HBM address spaces of LD/ST."""
    KV = 0         #: KV cache (int8 values + float32 scales per row)
    OUT = 1        #: output region (logits)


class Header(data.Struct):
    opcode: Opcode
    wait: unsigned(4)       #: bit u: pop a token from unit u before starting
    signal: unsigned(4)     #: bit u: push a token to unit u on completion


class SysFmt(data.Struct):
    """LOOP / SETR / END / NOP."""
    hdr: Header
    rd: Reg                 #: SETR destination, LOOP index register
    ra: Reg                 #: SETR multiplicand register, LOOP count register
    rb: Reg                 #: SETR addend register
    mul: signed(16)         #: SETR: R[ra] multiplier
    add: signed(32)         #: SETR addend; LOOP count addend
    lim: unsigned(32)       #: SETR: result = min(.., lim) (unsigned compare)
    shr: unsigned(5)        #: LOOP: count = max(0, R[ra] + add) >> shr
    body: unsigned(16)      #: LOOP: instructions in the body


class WeightFmt(data.Struct):
    """MV / MM (matrix engine) and EMBED (row gather): a packed weight tensor."""
    hdr: Header
    src: Buf                #: MV/MM: int8 input buffer
    dst: Buf                #: float32 output buffer
    rows_reg: Reg           #: MM/EMBED: rows = R[rows_reg]; MV: 1 row
    pos_reg: Reg            #: EMBED: token ids from the token buffer at R[pos_reg] + row
    bits: unsigned(4)       #: weight bit width
    n_keep: unsigned(5)     #: N of N:M (1 when dense)
    m: unsigned(5)          #: M of N:M (1 when dense)
    group_log2: unsigned(4) #: log2 of the quant group size
    kind: unsigned(2)       #: 0 signed, 1 unsigned with a min (GGUF Q4_1), 2 two-level (WeightFormat.kind)
    shift: unsigned(5)      #: tensor scale shift: weight = (q * S + M) * 2**-shift (QTensor.fixed), <= 25
    n_out: unsigned(20)     #: output rows N of the tensor
    k_in: unsigned(18)      #: input columns K of the tensor
    w_off: unsigned(32)     #: byte offset of the tensor in every weight channel


class MemFmt(data.Struct):
    """LD_KV / ST_KV / ST_OUT: rows between an on-chip buffer and HBM."""
    hdr: Header
    buf: Buf
    space: Space
    rows_reg: Reg           #: rows = R[rows_reg] if not ZERO, else ``rows``
    rows: unsigned(16)
    row_bytes: unsigned(20) #: bytes per row in HBM
    preg: Reg               #: address = addr + R[preg] * pmul
    pmul: unsigned(24)
    addr: unsigned(36)      #: byte address in the space


class AttnFmt(data.Struct):
    """QK and PV (MPE): one kv head's attention, streaming its K or V cache region."""
    hdr: Header
    src: Buf                #: QK: int8 queries (QQ); PV: int8 probabilities (PQ)
    dst: Buf                #: QK: scores (S); PV: attention output (A)
    aux: Buf                #: QK: key scales (KS); PV: unused
    rows_reg: Reg           #: token rows T = R[rows_reg]
    len_reg: Reg            #: row t attends positions < R[len_reg] + len_add + t
    len_add: signed(6)
    kvh: unsigned(8)        #: kv head g; its query heads are g*rep .. g*rep + rep - 1
    rep: unsigned(6)        #: query heads per kv head
    head_dim: unsigned(10)
    bits: unsigned(4)       #: KV cache values: format int{bits}r/32
    cap: unsigned(16)       #: positions the cache holds (score row stride, V columns)
    sink: unsigned(4)       #: block-sparse: leading blocks always attended
    window: unsigned(8)     #: block-sparse: blocks attended up to the row's own (0: dense)
    kv_off: unsigned(24)    #: the head's cache region in every weight channel, in 64-byte units


class SoftFmt(data.Struct):
    """SOFTMAX (SFU): the scores of kv heads ``kvh .. kvh + kvn - 1`` -> the int8
    probabilities PV takes (one operation for several heads: its dependent passes wait
    for the SFU's lanes once, not once per head)."""
    hdr: Header
    src: Buf                #: scores (S)
    dst: Buf                #: int8 probabilities (PQ)
    aux: Buf                #: value scales (VS)
    rows_reg: Reg
    len_reg: Reg            #: as AttnFmt
    len_add: signed(6)
    kvh: unsigned(8)
    rep: unsigned(6)
    cap: unsigned(16)
    sink: unsigned(4)
    window: unsigned(8)
    scale: unsigned(32)     #: float32 bits of the score scale 1/sqrt(head_dim)
    kvn: unsigned(6)        #: kv heads in the operation (0 means 1)


class KvStFmt(data.Struct):
    """ST_KT (ST): rows of int8 K or V values into the KV cache's raw tensors."""
    hdr: Header
    src: Buf                #: int8 rows (T x kv_heads*head_dim), from QUANT
    rows_reg: Reg           #: T = R[rows_reg]
    pos_reg: Reg            #: row t is position R[pos_reg] + t
    kind: unsigned(1)       #: 0: K (rows = positions); 1: V (stored transposed)
    bits: unsigned(4)       #: int{bits}r/32
    kv_heads: unsigned(8)
    head_dim: unsigned(10)
    cap: unsigned(16)
    kv_off: unsigned(24)    #: head 0's region in every weight channel, 64-byte units
    head_stride: unsigned(24)   #: between heads' regions, 64-byte units


class SfuFmt(data.Struct):
    """Element-wise and reduction SFU operations."""
    hdr: Header
    src: Buf
    src2: Buf               #: ADD/SILU_MUL second operand
    dst: Buf
    rows_reg: Reg           #: rows = R[rows_reg]
    n: unsigned(17)         #: elements per row (SOFTMAX: heads; ARGMAX: vocab)
    seg: unsigned(10)       #: QUANT / DEQUANT segment (0: whole row), QUANTG group, ROPE head_dim
    aux_reg: Reg            #: ROPE: position register (row t: R[aux_reg] + t)
    aux: signed(8)          #: DEQUANT: 1 if the source holds QUANTG's result (seg: its group), else 0
    table: unsigned(24)     #: float32 element offset into the SFU tables
    imm: unsigned(32)       #: float32 bits: RMSNORM eps, FILL value; QUANT largest level (0: 127); SOFTMAX: stride


FORMATS = {}
UNIT_OF = {}
for _op, _fmt, _unit in [
        (Opcode.NOP, SysFmt, Unit.SYS), (Opcode.END, SysFmt, Unit.SYS),
        (Opcode.LOOP, SysFmt, Unit.SYS), (Opcode.SETR, SysFmt, Unit.SYS),
        (Opcode.LD_KV, MemFmt, Unit.LD), (Opcode.EMBED, WeightFmt, Unit.LD),
        (Opcode.ST_KV, MemFmt, Unit.ST), (Opcode.ST_OUT, MemFmt, Unit.ST),
        (Opcode.MV, WeightFmt, Unit.MPE), (Opcode.MM, WeightFmt, Unit.MPE),
        (Opcode.ST_KT, KvStFmt, Unit.ST),
        (Opcode.QK, AttnFmt, Unit.MPE), (Opcode.PV, AttnFmt, Unit.MPE),
        (Opcode.RMSNORM, SfuFmt, Unit.SFU), (Opcode.ROPE, SfuFmt, Unit.SFU),
        (Opcode.SOFTMAX, SoftFmt, Unit.SFU), (Opcode.SILU_MUL, SfuFmt, Unit.SFU),
        (Opcode.ADD, SfuFmt, Unit.SFU), (Opcode.QUANT, SfuFmt, Unit.SFU),
        (Opcode.DEQUANT, SfuFmt, Unit.SFU),
        (Opcode.ARGMAX, SfuFmt, Unit.SFU), (Opcode.FILL, SfuFmt, Unit.SFU),
        (Opcode.QUANTG, SfuFmt, Unit.SFU)]:
    FORMATS[_op] = _fmt
    UNIT_OF[_op] = _unit
assert set(FORMATS) == set(Opcode)

#: fields holding IEEE float32 bits; :class:`Instr` takes and shows them as floats
FLOAT_FIELDS = {SoftFmt: ("scale",), SfuFmt: ("imm",)}
_FLOAT_OPS = {(Opcode.SOFTMAX, "scale"), (Opcode.RMSNORM, "imm"), (Opcode.FILL, "imm"), (Opcode.QUANT, "imm")}


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


# Flattened field tables: name -> (offset, width, shape) for every format; the
# header fields are flattened to their own names (opcode, wait, signal).
def _flatten(layout, base=0, prefix=""):
    out = {}
    for name, fld in data.Layout.cast(layout):
        if isinstance(fld.shape, type) and issubclass(fld.shape, data.Struct):
            out.update(_flatten(fld.shape, base + fld.offset, ""))
        else:
            out[prefix + name] = (base + fld.offset, fld.width, fld.shape)
    return out


_FIELDS = {fmt: _flatten(fmt) for fmt in set(FORMATS.values())}
for _fmt, _fl in _FIELDS.items():
    _size = data.Layout.cast(_fmt).size
    assert _size <= WORD_BITS, f"{_fmt.__name__} is {_size} bits"
    assert _fl["opcode"][:2] == (0, 6), _fmt


#: The register-read fields of each unit format, in layout order: the dispatcher reads
#: these registers when it enqueues an instruction and hands their values to the unit
#: with the word (``hw/control.py``), so a queued instruction no longer depends on them.
REG_FIELDS = {fmt: tuple(n for n, (o, w, sh) in sorted(fl.items(), key=lambda kv: kv[1][0]) if sh is Reg)
              for fmt, fl in _FIELDS.items() if fmt is not SysFmt}
MAX_REG_FIELDS = max(len(v) for v in REG_FIELDS.values())


def reg_values(ins: "Instr", regs) -> list:
    """The values the dispatcher reads for ``ins``'s register fields (:data:`REG_FIELDS`)."""
    return [int(regs[Reg(ins.f.get(n, 0)).value]) for n in REG_FIELDS[FORMATS[Opcode(ins.op)]]]


def setr_value(regs, rb, ra, mul, add, lim):
    """``SETR``: ``min((R[rb] + R[ra] * mul + add) mod 2**32, lim)`` (unsigned compare).

    ``regs`` may hold ints or numpy int64 arrays (one column per run)."""
    import numpy as np

    v = (regs[rb] + regs[ra] * mul + add) & ((1 << REG_BITS) - 1)
    return np.minimum(v, lim) if isinstance(v, np.ndarray) else min(v, lim)


def loop_trips(regs, ra, add, shr):
    """``LOOP``: ``max(0, R[ra] + add) >> shr`` trips (``R[ra]`` unsigned, ``add`` signed)."""
    import numpy as np

    v = regs[ra] + add
    return (np.maximum(v, 0) if isinstance(v, np.ndarray) else max(v, 0)) >> shr


def _shape_range(shape):
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        return None
    s = shape if hasattr(shape, "signed") else unsigned(shape)
    if s.signed:
        return -(1 << (s.width - 1)), (1 << (s.width - 1)) - 1
    return 0, (1 << s.width) - 1


@dataclass
class Instr:
    """One instruction: its opcode and named fields (unset fields are 0).

    Enum-typed fields take the enum member or its int; float fields (QK ``scale``,
    RMSNORM/FILL ``imm``) take a Python float. ``wait``/``signal`` take unit masks.
    """
    op: Opcode
    f: dict = field(default_factory=dict)

    def __getattr__(self, name):
        if name in ("op", "f"):
            raise AttributeError(name)
        fl = _FIELDS[FORMATS[self.op]]
        if name not in fl:
            raise AttributeError(f"{self.op.name} has no field {name!r}")
        v = self.f.get(name, 0)
        shape = fl[name][2]
        if isinstance(shape, type) and issubclass(shape, enum.Enum) and not isinstance(v, shape):
            return shape(v)
        return v

    @property
    def unit(self) -> Unit:
        return UNIT_OF[self.op]

    def with_(self, **kw) -> "Instr":
        return Instr(self.op, {**self.f, **kw})


def _field_int(op, name, v, shape):
    if isinstance(v, enum.Enum):
        v = v.value
    if (op, name) in _FLOAT_OPS and isinstance(v, float):
        v = f32_bits(v)
    if isinstance(v, bool):
        v = int(v)
    if not isinstance(v, int):
        raise IsaError(f"{op.name}: field {name} must be an int, not {v!r}")
    rng = _shape_range(shape)
    if rng is None:
        try:
            shape(v)
        except ValueError:
            raise IsaError(f"{op.name}: field {name}: {v} is not a valid {shape.__name__}") from None
    elif not rng[0] <= v <= rng[1]:
        raise IsaError(f"{op.name}: field {name} = {v} does not fit {rng[0]}..{rng[1]}")
    return v


def encode(ins: Instr) -> int:
    """The instruction as an int (bit 0 = LSB of the word), using the layout's field offsets."""
    op = Opcode(ins.op)
    fl = _FIELDS[FORMATS[op]]
    word = op.value
    for name, v in ins.f.items():
        if name == "opcode":
            continue
        if name not in fl:
            raise IsaError(f"{op.name}: no field {name!r} in format {FORMATS[op].__name__}")
        off, width, shape = fl[name]
        word |= (_field_int(op, name, v, shape) & ((1 << width) - 1)) << off
    return word


def _nest(fmt, flat):
    """Flat field dict -> nested dict for ``layout.const``."""
    out = {"hdr": {}}
    hdr_names = set(_flatten(Header))
    for k, v in flat.items():
        (out["hdr"] if k in hdr_names else out)[k] = v
    return out


def encode_slow(ins: Instr) -> int:
    """The same encoding through ``layout.const(...).as_value()`` (the amaranth path)."""
    op = Opcode(ins.op)
    fmt = FORMATS[op]
    fl = _FIELDS[fmt]
    flat = {"opcode": op}
    for k, v in ins.f.items():
        if k not in fl:
            raise IsaError(f"{op.name}: no field {k!r} in format {fmt.__name__}")
        off, width, shape = fl[k]
        iv = _field_int(op, k, v, shape)
        flat[k] = shape(iv) if isinstance(shape, type) and issubclass(shape, enum.Enum) else iv
    return fmt.const(_nest(fmt, flat)).as_value().value


def _opcode_of(word: int, where: str) -> Opcode:
    code = word & 0x3F
    try:
        return Opcode(code)
    except ValueError:
        raise IsaError(f"{where}: illegal opcode {code} (field opcode, bits [0:6))") from None


def decode(word: int, where: str = "instruction") -> Instr:
    """An int word -> :class:`Instr` (only nonzero fields are kept)."""
    if not 0 <= word < 1 << WORD_BITS:
        raise IsaError(f"{where}: not a {WORD_BITS}-bit word")
    op = _opcode_of(word, where)
    f = {}
    for name, (off, width, shape) in _FIELDS[FORMATS[op]].items():
        if name in ("opcode", "rsv"):
            continue
        v = (word >> off) & ((1 << width) - 1)
        rng = _shape_range(shape)
        if rng is None:
            try:
                v = shape(v)
            except ValueError:
                raise IsaError(f"{where}: {op.name}: field {name} = {v} is not a valid "
                               f"{shape.__name__}") from None
            if v.value:
                f[name] = v
            continue
        if rng[0] < 0 and v >= 1 << (width - 1):
            v -= 1 << width
        if v:
            f[name] = bits_f32(v) if (op, name) in _FLOAT_OPS else v
    used = sum(w for n, (o, w, s) in _FIELDS[FORMATS[op]].items())
    if word >> data.Layout.cast(FORMATS[op]).size:
        raise IsaError(f"{where}: {op.name}: bits above {data.Layout.cast(FORMATS[op]).size} are set")
    del used
    return Instr(op, f)


def decode_slow(word: int) -> Instr:
    """Decode through ``data.Const`` (the amaranth path); same result as :func:`decode`."""
    op = _opcode_of(word, "instruction")
    fmt = FORMATS[op]
    c = data.Const(data.Layout.cast(fmt), word)
    f = {}
    for name in _FIELDS[fmt]:
        if name in ("opcode", "rsv"):
            continue
        v = getattr(c.hdr, name) if name in ("wait", "signal") else getattr(c, name)
        iv = v.value if isinstance(v, enum.Enum) else int(v)
        if iv:
            f[name] = v if isinstance(v, enum.Enum) else (bits_f32(iv) if (op, name) in _FLOAT_OPS else iv)
    return Instr(op, f)


def encode_program(prog) -> bytes:
    return b"".join(encode(i).to_bytes(WORD_BYTES, "little") for i in prog)


def decode_program(image: bytes, where: str = "program") -> list:
    if len(image) % WORD_BYTES:
        raise IsaError(f"{where}: {len(image)} bytes is not a whole number of "
                       f"{WORD_BYTES}-byte instructions (truncated?)")
    prog = [decode(int.from_bytes(image[i:i + WORD_BYTES], "little"), f"{where}[{i // WORD_BYTES}]")
            for i in range(0, len(image), WORD_BYTES)]
    if not prog or prog[-1].op != Opcode.END:
        raise IsaError(f"{where}: does not end with END (truncated?)")
    return prog


_BUF_FIELDS = {op: ("src", "dst") for op, f in FORMATS.items() if f is SfuFmt}
_BUF_FIELDS.update({Opcode.ADD: ("src", "src2", "dst"), Opcode.SILU_MUL: ("src", "src2", "dst"),
                    Opcode.MV: ("src", "dst"), Opcode.MM: ("src", "dst"), Opcode.EMBED: ("dst",),
                    Opcode.QK: ("src", "aux", "dst"), Opcode.PV: ("src", "dst"),
                    Opcode.SOFTMAX: ("src", "aux", "dst"), Opcode.ST_KT: ("src",),
                    Opcode.LD_KV: ("buf",), Opcode.ST_KV: ("buf",), Opcode.ST_OUT: ("buf",)})


def _units(mask):
    return "|".join(u.name for u in TOKEN_UNITS if mask >> u.value & 1)


def disasm(prog, start=0) -> str:
    """Readable listing: index, unit, opcode, fields; loop bodies indented."""
    lines, ends = [], []
    for i, ins in enumerate(prog):
        while ends and i >= ends[-1]:
            ends.pop()
        ind = "  " * len(ends)
        parts = []
        f = ins.f
        rn = lambda key: Reg(f.get(key, 0)).name
        if ins.op == Opcode.SETR:
            expr = rn("rb")
            if f.get("mul"):
                expr += f" + {rn('ra')}*{f['mul']}"
            if f.get("add"):
                expr += f" + {f['add']}"
            if f.get("lim", 0) != NO_LIMIT:
                expr = f"min({expr}, {f.get('lim', 0)})"
            parts.append(f"{rn('rd')} = {expr}")
        elif ins.op == Opcode.LOOP:
            cnt = rn("ra") + (f" + {f['add']}" if f.get("add") else "")
            cnt = f"({cnt}) >> {f['shr']}" if f.get("shr") else cnt
            parts.append(f"{rn('rd')} < {cnt}  body={f.get('body', 0)}")
        shown = dict(ins.f)
        for k in _BUF_FIELDS.get(ins.op, ()):
            shown.setdefault(k, Buf(0))
        for k, v in (() if ins.op in (Opcode.SETR, Opcode.LOOP) else shown.items()):
            if k in ("wait", "signal"):
                continue
            if isinstance(v, enum.Enum):
                v = v.name
            elif isinstance(v, float):
                v = f"{v:.6g}"
            parts.append(f"{k}={v}")
        tok = ""
        if ins.f.get("wait"):
            tok += f" wait={_units(ins.f['wait'])}"
        if ins.f.get("signal"):
            tok += f" signal={_units(ins.f['signal'])}"
        lines.append(f"{start + i:6d}  {ins.unit.name:3s} {ind}{ins.op.name:9s} {' '.join(parts)}{tok}")
        if ins.op == Opcode.LOOP:
            ends.append(i + 1 + ins.f.get("body", 0))
    return "\n".join(lines)


DOC_INTRO = """# flightllm ISA

Generated by `python -m flightllm.hw.isa docs/isa.md` from the `amaranth.lib.data`
layouts in `hw/isa.py` (do not edit the tables by hand). The semantics of the
units, tokens, registers and loops are in the module docstring of `hw/isa.py`;
the programs built from these instructions are described in `compiler/schedule.py`;
the exact arithmetic in `runtime/arith.py` (MPE) and `runtime/sfu.py` (SFU).

## Word and header

Every instruction is one 128-bit little-endian word. Bits [0:6) are the opcode in
every format, [6:10) the `wait` mask and [10:14) the `signal` mask (bit 0 LD,
1 ST, 2 MPE, 3 SFU). Units: LD (HBM -> buffers), ST (buffers -> HBM), MPE (matrix
engine), SFU (special functions), SYS (dispatcher: LOOP, SETR, END, NOP).

## Runtime registers (length adaptivity)

| reg | written by | meaning |
|---|---|---|
| POS | host (AXI-Lite) | position of the first token of this run |
| LEN | host (AXI-Lite) | tokens in this run (prefill) |
| ARGMAX | ARGMAX instruction | argmax of the last logits row, read by the host |
| CPOS, CLEN, KVLEN, OUTROW | SETR | chunk position, chunk length, attended positions, first logits row |
| CHUNK, TILE | LOOP | loop indices |

`LOOP idx, count_reg, add, shr, body` runs the next `body` instructions
`max(0, R[count_reg] + add) >> shr` times: the prefill chunk loop takes its trip
count from LEN; attention (QK, SOFTMAX, PV) and the KV scale loads read the attended
length from CPOS and KVLEN, so one decode program (no loops) and one prefill program
serve every position and prompt length. `SETR rd, rb, ra, mul, add, lim` computes
`R[rd] = min(R[rb] + R[ra] * mul + add, lim)`. Address and row fields read
registers at issue: `rows_reg`, `pos_reg`, `aux_reg`, `len_reg`, and the
patch pair `(preg, pmul)` adds `R[preg] * pmul` to an address or element offset.

## Numerics decisions (the golden model implements them bit for bit)

* **MPE**: INT8 activations in [-127, 127] with an 8-bit factor per quant group x
  INT8-widened weights (GGUF's own integers for Q8_0/Q4_0/Q4_1), exact group sums,
  times the group's binary16 scale and min as 27-bit fixed point (min x the group's
  activation sum), times the activation factor, into a wrapping int64 accumulator
  (`runtime/arith.py`). MPE result to float: `float32(acc) * float32(ldexp(A, -shift))`.
* **Requantize for the MPE** (QUANTG): one float32 scale `A` per row and an 8-bit
  factor `u` per group of the consuming tensor's group size, `x ~ q * u * A`
  (`runtime/sfu.py`). Per-vector INT8 cost +3.1% perplexity on SmolLM2, this +0.3%
  (`docs/numerics.md`).
* **Requantize** (QUANT) per row or per head segment to the largest level `Q`
  (`imm`; 0 means 127, the INT4 KV cache uses 7): `absmax` in float32,
  `scale = absmax / Q`, `q = clip(rint(x * (Q / absmax)), -Q, Q)`
  (float32, ties to even); absmax 0 gives q = 0, scale 0.
* **SFU** is IEEE binary32 without FMA; every reduction uses `sfu_lanes` lanes of
  `sfu_acc_slots` accumulators (lane j's beats go to its slots in turn, each adding
  in order from +0.0, so a pipelined adder accumulates every cycle) and a fixed
  pairwise tree over the slots, then the lanes. `exp` is fixed point: `t = x log2 e`
  from one integer product, `2^frac(t)` from a 256-entry table and a quadratic,
  rounded once to float32, flush below 2^-126 (max error 0.8 ulp); SiLU is
  `g / (1 + exp(-g))`, rsqrt is `1 / sqrt` (`runtime/sfu.py`).
* **RoPE** on adjacent pairs (2i, 2i+1) with cos/sin tables computed by the compiler
  in float64 and stored as float32 (`tables.bin`, table `rope`).
* **KV cache** (`hw/kvcache.py`): INT8 (or INT4) values per (position, kv head) in
  raw packed tensors in the weight channels (V transposed), one float32 scale each in
  space KV, written by QUANT (per head), ST_KT and ST_KV. Attention runs one kv head
  at a time on the MPE: scores `(float32(q . k) * q_scale) * k_scale` (exact int32
  products); SOFTMAX `e = exp((s - max) * float32(1/sqrt(head_dim)))` and
  requantizes `e * v_scale` like QUANTG in groups of 32 positions, with the
  normaliser folded into the row scale; PV is exact integer `P . V` times that scale
  (`runtime/sfu.py`). INT8 probabilities cost +0.57% perplexity on SmolLM2 over the
  float32 P.V they replace (`docs/golden_quality.md`).
* **Embedding**: the tied `token_embd.weight` row gathered from the weight channels by
  token id (token buffer at the position) and dequantized as
  `float32(q * S + M) * 2**-shift` (the integer rounded once: GGUF's own float32
  `d * q + m` for Q8_0/Q4_0/Q4_1); the LM head is an MV over the same tensor.

Why these: the integer MPE path and correctly rounded float32 SFU operations are
what an RTL implementation computes natively (DSP48E2 chains; Xilinx floating-point
operators), and fixing the summation order makes the float part reproducible
without any tolerance. What they cost is measured as perplexity against the float
reference (`bench/golden_quality.py`, `flightllm perplexity`).

Performance (see `docs/speed.md`, `flightllm perf`): attention streams the KV cache
through the weight streamers at HBM speed, so decode follows the bytes a token reads.

## Formats

"""


def write_doc(path) -> None:
    from pathlib import Path

    Path(path).write_text(DOC_INTRO + markdown_table())



def markdown_table() -> str:
    """The field table of every format, generated from the layouts (docs/isa.md)."""
    out = []
    for fmt in (SysFmt, WeightFmt, MemFmt, KvStFmt, AttnFmt, SoftFmt, SfuFmt):
        ops = ", ".join(o.name for o, f in FORMATS.items() if f is fmt)
        size = data.Layout.cast(fmt).size
        out.append(f"### {fmt.__name__} ({size} of {WORD_BITS} bits): {ops}\n")
        if fmt.__doc__:
            out.append(fmt.__doc__.strip().splitlines()[0] + "\n")
        out.append("| bits | field | shape |\n|---|---|---|")
        for name, (off, width, shape) in sorted(_FIELDS[fmt].items(), key=lambda kv: kv[1][0]):
            if isinstance(shape, type) and issubclass(shape, enum.Enum):
                sh = f"enum {shape.__name__} ({width} bits)"
            else:
                s = shape if hasattr(shape, "signed") else unsigned(shape)
                sh = f"{'signed' if s.signed else 'unsigned'}({s.width})"
            if (FORMATS_FLOAT := FLOAT_FIELDS.get(fmt)) and name in FORMATS_FLOAT:
                sh += ", float32 bits"
            out.append(f"| [{off}:{off + width}) | `{name}` | {sh} |")
        out.append("")
    out.append("### Enumerations\n")
    for e in (Opcode, Unit, Reg, Buf, Space):
        out.append(f"- **{e.__name__}** ({enum.Shape.cast(e).width} bits): " +
                   ", ".join(f"{m.name}={m.value}" + (f" ({UNIT_OF[m].name})" if e is Opcode else "")
                             for m in e))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    write_doc(sys.argv[1] if len(sys.argv) > 1 else "docs/isa.md")
