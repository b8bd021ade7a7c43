"""The register map (hw/regmap.py) and the s_axi_control slave (hw/axil.py) in amaranth.sim.

A small AXI4-Lite manager (:class:`Manager`) drives the slave with random valid delays,
random ``bready``/``rready`` backpressure and AW/W in either order or together; it checks
on every transaction that no ready follows its valid combinationally, that ``bvalid`` /
``rvalid`` (and ``rdata``) hold until taken and that every response is OKAY; every wait is
bounded. A core model (a background testbench) answers each ``start`` pulse with a
``done`` pulse a set number of cycles later. Every offset comes from the register map.
"""

import copy
import random

import pytest
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from flightllm.hw import regmap as R
from flightllm.hw.axil import AXIL_MEMBERS, ControlSlave, axil_signature, axil_top_members
from flightllm.hw.params import get_preset
from flightllm.hw.regmap import Status, register_map

SIM = register_map(get_preset("sim"))
U280 = register_map(get_preset("u280"))
TIMEOUT = 100          # cycles any single wait may take


# -- the register map -----------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["sim", "u280", "vhk158"])
def test_map_layout(preset):
    p = get_preset(preset)
    rm = register_map(p)
    assert register_map(p) is rm
    regs = sorted(rm.registers, key=lambda r: r.offset)
    for a, b in zip(regs, regs[1:]):
        assert a.end <= b.offset, f"{a.name} overlaps {b.name}"
    assert [r.name for r in rm.ctrl] == ["CTRL", "GIER", "IP_IER", "IP_ISR"]
    assert [r.offset for r in rm.ctrl] == [R.CTRL, R.GIER, R.IP_IER, R.IP_ISR] == [0, 4, 8, 12]
    assert rm.args[0].offset == R.ARGS_BASE == 0x10
    names = [r.name for r in rm.args]
    C = p.weight_channels
    assert names == ["pos", "len", "prog_words", "watchdog", "kv_space", "out_space", "tok_space", "max_seq", "tab_offset",
                     "tab_words",
                     "instr"] + \
        [f"ch{c:02d}" for c in range(C)]
    for a, b in zip(rm.args, rm.args[1:]):          # the HLS strides: scalar 8, pointer 12
        assert b.offset - a.offset == {32: 8, 64: 12}[a.bits], (a, b)
    ptrs = rm.pointers
    assert all(r.bits == 64 and r.kind == "pointer" for r in ptrs)
    assert [r.name for r in rm.args if r.bits == 64] == [r.name for r in ptrs]
    assert rm.ports == ("instr",) + tuple(f"ch{c:02d}" for c in range(C))
    assert len(set(rm.ports)) == len(rm.ports)          # every m_axi port named once
    assert all(r.port is None for r in rm.registers if r.kind != "pointer")
    assert [r.name for r in rm.status] == ["status", "err_pc", "argmax", "cycles"]
    assert rm.status[0].offset == rm.args[-1].end
    assert all(r.access == "ro" and r.kind == "status" for r in rm.status)
    assert rm.end == rm.status[-1].end <= 1 << rm.addr_bits
    assert rm.addr_bits == max(12, (rm.end - 1).bit_length())
    words = rm.words()
    assert len({o for o, _, _ in words}) == len(words) == sum(r.nwords for r in rm.registers)
    assert [o for o, _, _ in words] == sorted(o for o, _, _ in words)
    assert R.ISA_REG["pos"].name == "POS" and R.ISA_REG["len"].name == "LEN" and R.ISA_REG["argmax"].name == "ARGMAX"
    assert rm.status_layout().size == 8 + 32 + 32 and rm.args_layout().size == 10 * 32 + (C + 1) * 64


def test_u280_map():
    assert U280.params.weight_channels == 32
    assert len(U280.pointers) == 33 and U280.addr_bits == 12 and U280.end <= 1 << 12
    assert U280["ch31"].offset == U280["instr"].offset + 32 * 12
    assert SIM.addr_bits == 12


def test_map_errors():
    with pytest.raises(ValueError, match="unknown register 'nope'"):
        SIM.by_name["nope"]
    with pytest.raises(KeyError):
        SIM["ch02"]             # the sim preset has two channels
    with pytest.raises(ValueError, match=r"register 'pos' is 32 bits: value 4294967296 out of range"):
        SIM["pos"].encode(1 << 32)
    with pytest.raises(ValueError, match="register 'instr'.*out of range"):
        SIM.arg_writes({"instr": -1})
    with pytest.raises(ValueError, match="register 'status' is not a kernel argument"):
        SIM.arg_writes({"status": 1})
    with pytest.raises(ValueError, match="register 'len': value must be an int"):
        SIM["len"].encode(1.5)
    with pytest.raises(ValueError, match="register 'cycles' has 2 word"):
        SIM["cycles"].decode([1])
    with pytest.raises(TypeError, match="needs HwParams"):
        register_map("u280")
    assert SIM.arg_writes({"instr": 0x1_2345_6789, "pos": 7}) == [
        (SIM["pos"].offset, 7), (SIM["instr"].offset, 0x2345_6789), (SIM["instr"].offset + 4, 1)]
    assert SIM["cycles"].decode([5, 1]) == (1 << 32) + 5


def test_doc_is_current(tmp_path):
    out = tmp_path / "regmap.md"
    R.main([str(out)])
    text = out.read_text(encoding="utf-8")
    assert "| 0x010-0x017 | `pos` |" in text and "`ch31`" in text and f"addr_bits` = {U280.addr_bits}" in text
    from pathlib import Path
    doc = Path(__file__).resolve().parent.parent / "docs" / "regmap.md"
    assert doc.read_text(encoding="utf-8") == text, \
        "docs/regmap.md is stale: python -m flightllm.hw.regmap docs/regmap.md"


def test_constructor_errors():
    with pytest.raises(TypeError, match="needs a RegisterMap, not HwParams.*register_map"):
        ControlSlave(get_preset("sim"))
    with pytest.raises(TypeError, match="needs a RegisterMap, not int"):
        ControlSlave(3)
    with pytest.raises(TypeError, match="addr_bits must be an int"):
        axil_signature(12.0)
    with pytest.raises(ValueError, match="addr_bits must be in"):
        axil_signature(2)
    with pytest.raises(ValueError, match="data_bits must be 32 or 64"):
        axil_signature(12, 16)
    sig = axil_signature(12)
    assert tuple(sig.members) == AXIL_MEMBERS
    assert sig.members["awaddr"].shape == 12 and sig.members["rdata"].shape == 32
    assert sig.members["awaddr"].flow == In and sig.members["awready"].flow == Out
    assert set(axil_top_members(12)) == {f"s_axi_control_{n}" for n in AXIL_MEMBERS}
    bad = copy.copy(SIM)
    bad.addr_bits = 6
    with pytest.raises(ValueError, match="past its 6-bit address"):
        ControlSlave(bad)


# -- the bus ----------------------------------------------------------------------------------

class Manager:
    """An AXI4-Lite manager for amaranth testbenches, with random delays and backpressure."""

    def __init__(self, bus, rng, delay=3, backpressure=0.4):
        self.bus, self.rng, self.delay, self.bp = bus, rng, delay, backpressure

    def _d(self):
        return self.rng.randrange(self.delay + 1)

    def _check_ready(self, ctx, valid, ready, v):
        """Set ``valid`` to ``v``; the ready of this cycle must not change (registered)."""
        before = ctx.get(ready)
        ctx.set(valid, v)
        assert ctx.get(ready) == before, f"{ready.name} follows {valid.name} combinationally"
        return before

    async def write(self, ctx, addr, value, strb=0xF, order="random"):
        b = self.bus
        aw_at, w_at = self._d(), self._d()
        if order == "together":
            aw_at = w_at = self._d()
        aw_done = w_done = None
        ctx.set(b.awaddr, addr)
        ctx.set(b.wdata, value)
        ctx.set(b.wstrb, strb)
        t = 0
        held = False
        while True:
            assert t < TIMEOUT, f"write 0x{addr:X}: no response after {t} cycles (aw {aw_done}, w {w_done})"
            aw_v = aw_done is None and t >= aw_at and (order != "w_first" or w_done is not None)
            w_v = w_done is None and t >= w_at and (order != "aw_first" or aw_done is not None)
            aw_hs = self._check_ready(ctx, b.awvalid, b.awready, aw_v) and aw_v
            w_hs = self._check_ready(ctx, b.wvalid, b.wready, w_v) and w_v
            bready = self.rng.random() >= self.bp
            ctx.set(b.bready, bready)
            bvalid = ctx.get(b.bvalid)
            assert not (held and not bvalid), "bvalid dropped before bready"
            if bvalid:
                assert aw_done is not None and w_done is not None, "B before AW and W"
                assert ctx.get(b.bresp) == 0
            if aw_hs:
                aw_done = t
            if w_hs:
                w_done = t
            await ctx.tick()
            t += 1
            if bvalid and bready:
                break
            held = bvalid
        ctx.set(b.awvalid, 0)
        ctx.set(b.wvalid, 0)
        ctx.set(b.bready, 0)
        if order == "together":
            assert aw_done == w_done, (aw_done, w_done)
        return aw_done, w_done

    async def read(self, ctx, addr):
        b = self.bus
        at = self._d()
        ctx.set(b.araddr, addr)
        t, ar_done, held = 0, None, None
        while True:
            assert t < TIMEOUT, f"read 0x{addr:X}: no response after {t} cycles"
            ar_v = ar_done is None and t >= at
            if self._check_ready(ctx, b.arvalid, b.arready, ar_v) and ar_v:
                ar_done = t
            rready = self.rng.random() >= self.bp
            ctx.set(b.rready, rready)
            rvalid = ctx.get(b.rvalid)
            if held is not None:
                assert rvalid and ctx.get(b.rdata) == held, "rvalid/rdata changed before rready"
            if rvalid:
                assert ar_done is not None and ar_done < t, "R before AR"
                assert ctx.get(b.rresp) == 0
                data = ctx.get(b.rdata)
            await ctx.tick()
            t += 1
            if rvalid and rready:
                break
            held = data if rvalid else None
        ctx.set(b.arvalid, 0)
        ctx.set(b.rready, 0)
        return data

    async def write_reg(self, ctx, reg, value, order="random"):
        for off, word in reg.encode(value):
            await self.write(ctx, off, word, order=order)

    async def read_reg(self, ctx, reg):
        return reg.decode([await self.read(ctx, reg.offset + 4 * k) for k in range(reg.nwords)])


class Core:
    """The kernel's side: answers each ``start`` pulse with ``done`` ``run_len`` cycles later
    (``run_len`` None: records the starts and leaves ``done`` to the testbench)."""

    def __init__(self, dut, run_len=20):
        self.dut, self.run_len, self.starts, self.dones, self.t = dut, run_len, [], [], 0

    async def run(self, ctx):
        due = None
        while True:
            if ctx.get(self.dut.start):
                assert due is None, f"start pulse at {self.t} during a run"
                self.starts.append(self.t)
                if self.run_len is None:
                    await ctx.tick()
                    self.t += 1
                    continue
                due = self.t + self.run_len
            fire = due is not None and self.t == due
            ctx.set(self.dut.done, fire)
            if fire:
                self.dones.append(self.t)
                due = None
            await ctx.tick()
            self.t += 1


def simulate(rm, body, run_len=20):
    """Run ``body(ctx, bus, dut, core)`` against a ControlSlave of ``rm`` with a core model."""
    dut = ControlSlave(rm)
    core = Core(dut, run_len)

    async def tb(ctx):
        await body(ctx, Manager(dut.bus, random.Random(1234)), dut, core)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(core.run, background=True)
    sim.add_testbench(tb)
    sim.run()
    return core


ORDERS = ("random", "aw_first", "w_first", "together")


@pytest.mark.parametrize("rm", [SIM, U280], ids=["sim", "u280"])
def test_args_round_trip_with_strobes(rm):
    """Every argument written (AW/W in every order) and read back equals the ``args`` output;
    byte strobes keep the unwritten bytes; reserved words read 0 and ignore writes."""
    rng = random.Random(5)
    args = rm.args if rm is SIM else rm.args[:8] + rm.args[-2:]

    async def body(ctx, bus, dut, core):
        want = {}
        for i, r in enumerate(args):
            v = rng.getrandbits(r.bits)
            await bus.write_reg(ctx, r, v, order=ORDERS[i % len(ORDERS)])
            want[r.name] = v
        for r in args:               # partial words: random strobes over random data
            for k in range(r.nwords):
                strb, d = rng.randrange(16), rng.getrandbits(32)
                await bus.write(ctx, r.offset + 4 * k, d, strb=strb)
                for j in range(4):
                    if strb >> j & 1:
                        sh = 32 * k + 8 * j
                        want[r.name] = want[r.name] & ~(0xFF << sh) | ((d >> 8 * j) & 0xFF) << sh
        for r in args:
            if rm is SIM or r.kind == "pointer":
                await bus.write(ctx, r.offset + 4 * r.nwords, 0xFFFFFFFF)     # the reserved word
                assert await bus.read(ctx, r.offset + 4 * r.nwords) == 0
        for r in args:
            assert await bus.read_reg(ctx, r) == want[r.name], r.name
            assert ctx.get(dut.args[r.name]) == want[r.name], r.name
        assert core.starts == []

    simulate(rm, body)


@pytest.mark.parametrize("order", ORDERS)
def test_write_orders(order):
    rng = random.Random(len(order))

    async def body(ctx, bus, dut, core):
        for r in SIM.args:
            v = rng.getrandbits(r.bits)
            for off, word in r.encode(v):
                aw, w = await bus.write(ctx, off, word, order=order)
                if order == "aw_first":
                    assert aw < w
                elif order == "w_first":
                    assert w < aw
            assert ctx.get(dut.args[r.name]) == v
            assert await bus.read_reg(ctx, r) == v

    simulate(SIM, body)


async def _ctrl(ctx, bus):
    return await bus.read(ctx, R.CTRL)


def test_ap_ctrl_hs():
    """ap_start -> one start pulse; ap_idle / ap_start while running; a second ap_start
    while running ignored; ap_done and ap_ready set at done, cleared by reading CTRL;
    cycles counts start to done; status registers from status_in."""
    run_len = 60

    async def body(ctx, bus, dut, core):
        assert await _ctrl(ctx, bus) == R.AP_IDLE
        await bus.write(ctx, R.CTRL, R.AP_START)
        assert len(core.starts) == 1
        assert await _ctrl(ctx, bus) == R.AP_START           # running: not idle, not done
        await bus.write(ctx, R.CTRL, R.AP_START)              # ignored while running
        for _ in range(3 * TIMEOUT):
            if core.dones:
                break
            await ctx.tick()
        assert core.dones, "no done"
        for _ in range(3):
            await ctx.tick()
        assert len(core.starts) == 1
        assert await _ctrl(ctx, bus) == R.AP_DONE | R.AP_IDLE | R.AP_READY
        assert await _ctrl(ctx, bus) == R.AP_IDLE             # clear on read
        assert await bus.read_reg(ctx, SIM["cycles"]) == run_len
        # status registers show status_in (read-only: writes ignored)
        ctx.set(dut.status_in.status, Status.WATCHDOG)
        ctx.set(dut.status_in.err_pc, 0xDEADBEEF)
        ctx.set(dut.status_in.argmax, 49151)
        for r in SIM.status:
            await bus.write(ctx, r.offset, 0x1234)
        assert await bus.read_reg(ctx, SIM["status"]) == Status.WATCHDOG.value
        assert await bus.read_reg(ctx, SIM["err_pc"]) == 0xDEADBEEF
        assert await bus.read_reg(ctx, SIM["argmax"]) == 49151
        assert await bus.read_reg(ctx, SIM["cycles"]) == run_len
        # a short run, then a start without reading CTRL: the start clears the stale ap_done
        core.run_len = 1
        await bus.write(ctx, R.CTRL, R.AP_START)
        for _ in range(TIMEOUT):
            if len(core.dones) == 2:
                break
            await ctx.tick()
        assert await bus.read_reg(ctx, SIM["cycles"]) == 1
        core.run_len = 70
        await bus.write(ctx, R.CTRL, R.AP_START)
        ctrl = await _ctrl(ctx, bus)
        assert len(core.starts) == 3 and ctrl == R.AP_START, hex(ctrl)
        for _ in range(2 * TIMEOUT):
            if len(core.dones) == 3:
                break
            await ctx.tick()
        assert await bus.read_reg(ctx, SIM["cycles"]) == 70

    core = simulate(SIM, body, run_len=run_len)
    assert [d - s for s, d in zip(core.starts, core.dones)] == [60, 1, 70]


def test_done_read_race():
    """A CTRL read looked up in the cycle done arrives: that read returns the running state
    (ap_done 0), and ap_done is not lost: the next read returns it. A done while idle is
    ignored."""
    async def body(ctx, bus, dut, core):
        b = dut.bus
        await bus.write(ctx, R.IP_IER, R.IRQ_DONE)
        ctx.set(dut.done, 1)                  # done while idle: ignored
        await ctx.tick()
        ctx.set(dut.done, 0)
        assert await _ctrl(ctx, bus) == R.AP_IDLE and await bus.read(ctx, R.IP_ISR) == 0
        await bus.write(ctx, R.CTRL, R.AP_START)
        ctx.set(b.araddr, R.CTRL)
        ctx.set(b.arvalid, 1)
        assert ctx.get(b.arready)
        await ctx.tick()                      # AR taken
        ctx.set(b.arvalid, 0)
        ctx.set(dut.done, 1)                  # the lookup cycle
        await ctx.tick()
        ctx.set(dut.done, 0)
        ctx.set(b.rready, 1)
        assert ctx.get(b.rvalid) and ctx.get(b.rdata) == R.AP_START
        await ctx.tick()
        ctx.set(b.rready, 0)
        assert await _ctrl(ctx, bus) == R.AP_DONE | R.AP_READY | R.AP_IDLE
        assert await _ctrl(ctx, bus) == R.AP_IDLE
        await bus.write(ctx, R.CTRL, R.AP_START)
        ctx.set(dut.done, 1)                  # done and CTRL's clear-on-read apart
        await ctx.tick()
        ctx.set(dut.done, 0)
        assert await _ctrl(ctx, bus) == R.AP_DONE | R.AP_READY | R.AP_IDLE
        assert len(core.starts) == 2

    simulate(SIM, body, run_len=None)


def test_auto_restart():
    async def body(ctx, bus, dut, core):
        await bus.write(ctx, R.CTRL, R.AP_START | R.AUTO_RESTART)
        for _ in range(10 * TIMEOUT):
            if len(core.dones) >= 3:
                break
            await ctx.tick()
        ctrl = await _ctrl(ctx, bus)
        assert ctrl & (R.AP_START | R.AUTO_RESTART | R.AP_IDLE) == R.AP_START | R.AUTO_RESTART, hex(ctrl)
        await bus.write(ctx, R.CTRL, 0)                      # clear auto_restart: the run in progress is the last
        n = len(core.starts)
        for _ in range(3 * TIMEOUT):
            await ctx.tick()
        assert len(core.starts) == n and len(core.dones) == n
        assert await _ctrl(ctx, bus) == R.AP_DONE | R.AP_READY | R.AP_IDLE
        assert await _ctrl(ctx, bus) == R.AP_IDLE

    core = simulate(SIM, body, run_len=25)
    assert len(core.starts) >= 4
    # each restart follows its done by one cycle
    assert all(s == d + 1 for d, s in zip(core.dones, core.starts[1:]))


def test_interrupts():
    async def body(ctx, bus, dut, core):
        async def run():
            n = len(core.dones)
            await bus.write(ctx, R.CTRL, R.AP_START)
            for _ in range(2 * TIMEOUT):
                if len(core.dones) > n:
                    break
                await ctx.tick()
            for _ in range(3):
                await ctx.tick()
            await _ctrl(ctx, bus)

        await run()                                          # nothing enabled: ISR stays 0
        assert await bus.read(ctx, R.IP_ISR) == 0 and not ctx.get(dut.interrupt)
        await bus.write(ctx, R.IP_IER, R.IRQ_DONE)
        await run()                                          # ISR done set, but GIER off
        assert await bus.read(ctx, R.IP_ISR) == R.IRQ_DONE and not ctx.get(dut.interrupt)
        await bus.write(ctx, R.GIER, R.GIE)
        await ctx.tick()
        assert ctx.get(dut.interrupt)
        assert await bus.read(ctx, R.GIER) == R.GIE and await bus.read(ctx, R.IP_IER) == R.IRQ_DONE
        await bus.write(ctx, R.IP_ISR, R.IRQ_DONE)           # toggle on write: clears it
        await ctx.tick()
        assert await bus.read(ctx, R.IP_ISR) == 0 and not ctx.get(dut.interrupt)
        await bus.write(ctx, R.IP_ISR, R.IRQ_DONE | R.IRQ_READY)   # toggles both on (no mask on ISR)
        assert await bus.read(ctx, R.IP_ISR) == R.IRQ_DONE | R.IRQ_READY
        assert ctx.get(dut.interrupt)
        await bus.write(ctx, R.IP_ISR, R.IRQ_DONE | R.IRQ_READY)
        await bus.write(ctx, R.IP_IER, R.IRQ_DONE | R.IRQ_READY)
        await run()
        assert await bus.read(ctx, R.IP_ISR) == R.IRQ_DONE | R.IRQ_READY and ctx.get(dut.interrupt)
        await bus.write(ctx, R.IP_ISR, 0)                    # writing 0 changes nothing
        assert await bus.read(ctx, R.IP_ISR) == R.IRQ_DONE | R.IRQ_READY
        await bus.write(ctx, R.IP_ISR, R.IRQ_READY)
        assert await bus.read(ctx, R.IP_ISR) == R.IRQ_DONE and ctx.get(dut.interrupt)
        await bus.write(ctx, R.IP_ISR, R.IRQ_DONE, strb=0)   # no strobe: ignored
        assert await bus.read(ctx, R.IP_ISR) == R.IRQ_DONE
        await bus.write(ctx, R.GIER, 0)
        await ctx.tick()
        assert not ctx.get(dut.interrupt)

    simulate(SIM, body, run_len=10)


def test_unmapped_and_strobeless_writes():
    """Unmapped addresses read 0 and ignore writes (OKAY); no strobe, no write; CTRL bits
    other than ap_start / auto_restart are read-only."""
    unmapped = [SIM.end, SIM.end + 4, (1 << SIM.addr_bits) - 4]
    unmapped += [r.offset + 4 * r.nwords for r in SIM.registers if r.size > 4 * r.nwords]   # reserved words
    assert all(not (r.offset <= a < r.offset + 4 * r.nwords) for a in unmapped for r in SIM.registers)

    async def body(ctx, bus, dut, core):
        for r in SIM.args:
            await bus.write_reg(ctx, r, (1 << r.bits) - 1 - r.offset)
        before = {r.name: ctx.get(dut.args[r.name]) for r in SIM.args}
        for a in unmapped:
            await bus.write(ctx, a, 0xA5A5A5A5)
            assert await bus.read(ctx, a) == 0, hex(a)
        await bus.write(ctx, SIM["pos"].offset, 0, strb=0)
        await bus.write(ctx, R.CTRL, R.AP_START, strb=0b1110)   # the start bit's byte not strobed
        await bus.write(ctx, R.CTRL, R.AP_DONE | R.AP_IDLE | R.AP_READY)
        assert core.starts == []
        assert await _ctrl(ctx, bus) == R.AP_IDLE
        assert {r.name: ctx.get(dut.args[r.name]) for r in SIM.args} == before
        assert {r.name: await bus.read_reg(ctx, r) for r in SIM.args} == before
        await bus.write(ctx, R.CTRL + 2, R.AP_START)           # low address bits ignored: CTRL
        assert core.starts != []

    simulate(SIM, body)
