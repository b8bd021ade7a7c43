"""ISA: encode/decode round trips through the amaranth layouts, field extremes, bad words."""

import random

import pytest
from amaranth import unsigned
from amaranth.lib import data, enum

from flightllm.hw import isa
from flightllm.hw.isa import FORMATS, Instr, IsaError, Opcode


def _extremes(shape):
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        ms = list(shape)
        return [ms[0], ms[-1]]
    s = shape if hasattr(shape, "signed") else unsigned(shape)
    if s.signed:
        return [-(1 << (s.width - 1)), (1 << (s.width - 1)) - 1, -1, 1]
    return [0, (1 << s.width) - 1, 1]


def _fields(op):
    return {n: v for n, v in isa._FIELDS[FORMATS[op]].items() if n != "opcode"}


@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
def test_round_trip_every_opcode_and_extremes(op):
    rnd = random.Random(op.value)
    fl = _fields(op)
    cases = []
    for k in range(3):
        f = {}
        for name, (off, width, shape) in fl.items():
            ex = _extremes(shape)
            f[name] = ex[k % len(ex)]
        cases.append(f)
    for _ in range(5):
        f = {}
        for name, (off, width, shape) in fl.items():
            f[name] = rnd.choice(_extremes(shape))
        cases.append(f)
    for f in cases:
        ins = Instr(op, f)
        w = isa.encode(ins)
        assert w == isa.encode_slow(ins)                    # offsets agree with layout.const
        assert w < 1 << isa.WORD_BITS and w & 0x3F == op.value
        back = isa.decode(w)
        slow = isa.decode_slow(w)
        norm = lambda d: {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in d.items()
                          if (v.value if isinstance(v, enum.Enum) else v)}
        expect = {}
        for k, v in f.items():
            if (op, k) in isa._FLOAT_OPS:
                v = isa.bits_f32(v) if isinstance(v, int) else v
            expect[k] = v
        exp_n = norm(expect)
        got = norm(back.f)
        # float fields compare as floats, NaN-safe through their bits
        for k in list(exp_n):
            if (op, k) in isa._FLOAT_OPS:
                assert isa.f32_bits(got.pop(k, 0.0)) == isa.f32_bits(exp_n.pop(k))
        assert got == exp_n
        assert isa.encode(back) == w and isa.encode(slow) == w


def test_float_fields_and_layout_view():
    ins = Instr(Opcode.RMSNORM, dict(src=isa.Buf.X, dst=isa.Buf.H, n=576, imm=1e-5, rows_reg=isa.Reg.CLEN))
    w = isa.encode(ins)
    c = data.Const(data.Layout.cast(isa.SfuFmt), w)      # the view the RTL decoder uses
    assert c.hdr.opcode == Opcode.RMSNORM and c.dst == isa.Buf.H and c.n == 576
    assert isa.bits_f32(c.imm) == pytest.approx(1e-5)
    assert isa.decode(w).imm == pytest.approx(1e-5)


def test_every_format_fits_the_word_and_opcode_is_common():
    for op, fmt in FORMATS.items():
        lay = data.Layout.cast(fmt)
        assert lay.size <= isa.WORD_BITS
        assert isa._FIELDS[fmt]["opcode"][:2] == (0, 6)


def test_illegal_opcode_and_bad_images():
    with pytest.raises(IsaError, match="illegal opcode 63"):
        isa.decode(63)
    with pytest.raises(IsaError, match=r"prog\[1\]: illegal opcode"):
        isa.decode_program(isa.encode_program([Instr(Opcode.NOP)]) + (7).to_bytes(16, "little"), "prog")
    img = isa.encode_program([Instr(Opcode.NOP), Instr(Opcode.END)])
    with pytest.raises(IsaError, match="not a whole number"):
        isa.decode_program(img[:-3], "decode.bin")
    with pytest.raises(IsaError, match="does not end with END"):
        isa.decode_program(img[:16], "decode.bin")
    with pytest.raises(IsaError, match="field body"):
        isa.encode(Instr(Opcode.LOOP, dict(body=1 << 16)))
    with pytest.raises(IsaError, match="no field"):
        isa.encode(Instr(Opcode.END, dict(w_off=1)))
    with pytest.raises(IsaError, match="not a valid Reg"):
        isa.encode(Instr(Opcode.SETR, dict(rd=16)))
    # an enum field holding an undefined code
    bad = isa.encode(Instr(Opcode.LD_KV)) | (3 << isa._FIELDS[isa.MemFmt]["space"][0])
    with pytest.raises(IsaError, match="field space"):
        isa.decode(bad)


def test_disasm_and_doc_table():
    prog = [Instr(Opcode.LOOP, dict(rd=isa.Reg.TILE, ra=isa.Reg.KVLEN, add=15, shr=4, body=1)),
            Instr(Opcode.LD_KV, dict(buf=isa.Buf.KS, rows=16, signal=1 << isa.Unit.MPE.value)),
            Instr(Opcode.END)]
    text = isa.disasm(prog)
    assert "LOOP" in text and "signal=MPE" in text and "buf=KS" in text
    md = isa.markdown_table()
    for fmt in set(FORMATS.values()):
        assert fmt.__name__ in md
    assert "| [0:6) | `opcode` |" in md


def test_docs_isa_md_is_generated_from_the_layouts():
    from pathlib import Path
    doc = Path(__file__).resolve().parent.parent / "docs" / "isa.md"
    assert doc.read_text() == isa.DOC_INTRO + isa.markdown_table(), \
        "docs/isa.md is stale: run python -m flightllm.hw.isa docs/isa.md"
