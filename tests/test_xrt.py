"""The ``xrt`` backend (runtime/xrt.py), ``flightllm devices`` and ``flightllm flash``.

Without a board: the clear one-line errors (no pyxrt, bad xclbin), and :class:`XrtDevice`
against a fake ``pyxrt`` (injected in ``sys.modules``) whose kernel is a model of the
board: buffers with a host side and a device side (``sync`` copies between them), device
addresses per memory bank, the ap_ctrl_hs registers (ap_done clear-on-read, IP_ISR
toggle-on-write), and on ``ap_start`` the golden model running the program the pointer
arguments point at, reading the tokens and writing the logits and KV state through the
memory map. So the device generates what the golden backend generates only if every
address, size, sync and register the host side writes is right. Tests with a real board
carry the ``xrt`` marker.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from flightllm.cli import main
from flightllm.hw import regmap as R
from flightllm.hw.isa import WORD_BYTES, decode, decode_program
from flightllm.hw.memmap import GRANULE, interleave
from flightllm.hw.regmap import Status, register_map

from conftest import write_tiny_gguf

pytestmark = pytest.mark.usefixtures("isolated_cache")

KERNEL = "flightllm_kernel"                 # hw.kernel.KERNEL_NAME, spelled as a board shows it
UUID = "5eb0c0de-0000-4000-8000-00000000f1a7"
BANK_BASE = 0x40_0000_0000           # fake device addresses: bank g at BANK_BASE + g * 2**32
INSTR_BANK = 32                      # the instr port's bank (HBM[c] for chNN: bank c)


# -- a fake pyxrt ----------------------------------------------------------------------
class FakeBoard:
    """The card's state: loaded xclbin, buffers, registers, and the kernel model."""

    def __init__(self, params, artifact=None, cards=1, loaded=True, bind_registers=True):
        self.params, self.artifact, self.cards = params, artifact, cards
        self.map = register_map(params)
        self.uuid = UUID if loaded else ""
        self.bind_registers = bind_registers
        self.bos = []
        self.next = {}
        self.regs = {R.CTRL: R.AP_IDLE}
        self.writes = []                  # every register write, in order
        self.machine = None
        self.progs = {}
        self.runs = 0
        self.exclusive = False

    # which argument an index is, and its bank (kernel.xml order: the register map's)
    def group_id(self, i):
        r = self.map.args[i]
        if r.kind != "pointer":
            raise RuntimeError(f"argument {i} ({r.name}) is not a global memory argument")
        return INSTR_BANK if r.port == "instr" else int(r.port[2:])

    def locate(self, addr, n, bank):
        for bo in self.bos:
            if bo.addr <= addr and addr + n <= bo.addr + bo.size:
                assert bo.group == bank, f"address {addr:#x} is in bank {bo.group}, the port's bank is {bank}"
                return bo, addr - bo.addr
        raise AssertionError(f"device bytes {addr:#x}..{addr + n:#x} are in no buffer")

    # -- the kernel model ----------------------------------------------------------------
    def arg(self, name):
        r = self.map[name]
        return r.decode([self.regs.get(r.offset + 4 * k, 0) for k in range(r.nwords)])

    def mem(self, port, addr, n=None, data=None):
        bank = INSTR_BANK if port == "instr" else int(port[2:])
        bo, off = self.locate(addr, len(data) if data is not None else n, bank)
        if data is None:
            return bytes(bo.dev[off:off + n])
        bo.dev[off:off + len(data)] = data

    def space(self, base, nbytes, data=None):
        """A space (KV, OUT, TOK) through the memory map's interleave, as the LD/ST units see it."""
        C, kv = self.params.weight_channels, self.params.kv_channels
        out = bytearray()
        for a in range(0, nbytes, GRANULE):
            c, off = interleave(a, kv, C)
            n = min(GRANULE, nbytes - a)
            addr = self.arg(f"ch{c:02d}") + base + off
            if data is None:
                out += self.mem(f"ch{c:02d}", addr, n)
            else:
                self.mem(f"ch{c:02d}", addr, data=data[a:a + n])
        return bytes(out)

    def start(self):
        from flightllm.runtime.golden import Golden, GoldenError

        art, p = self.artifact, self.params
        plan = art.manifest["programs"]["plan"]
        C = p.weight_channels
        instr = self.arg("instr")
        image = self.mem("instr", instr, self.arg("prog_words") * WORD_BYTES)
        if image not in self.progs:
            self.progs[image] = [decode(int.from_bytes(image[i:i + WORD_BYTES], "little"))     # word by word,
                                 for i in range(0, len(image), WORD_BYTES)]                   # END or not
        prog = self.progs[image]
        tab_words = self.arg("tab_words")
        if self.machine is None:
            assert tab_words, "the first run must load the SFU tables"
            chans = [self.mem(f"ch{c:02d}", self.arg(f"ch{c:02d}"), plan["kv_base"]) for c in range(C)]
            self.machine = Golden(p, chans, None, plan, art.manifest["tensors"])
        m = self.machine
        if tab_words:
            m.tables = np.frombuffer(self.mem("instr", instr + self.arg("tab_offset"), 4 * tab_words), "<f4").copy()
        assert self.arg("max_seq") == plan["max_seq"]
        m.tokens[:] = np.frombuffer(self.space(self.arg("tok_space"), 4 * plan["max_seq"]), "<i4")
        status, pc, cycles = Status.OK, 0, 0
        try:
            cycles = m.run(prog, regs={"POS": self.arg("pos"), "LEN": self.arg("len")},
                           tables=bool(tab_words)).cycles
        except GoldenError as e:
            status, pc = Status[e.status], e.pc or 0
        self.space(self.arg("out_space"), m.out.size, m.out.tobytes())
        self.space(self.arg("kv_space"), m.kv.size, m.kv.tobytes())
        n = plan.get("kv_channel_bytes", 0)
        for c in range(C):
            self.mem(f"ch{c:02d}", self.arg(f"ch{c:02d}") + plan["kv_base"],
                     data=m.channels[c][plan["kv_base"]:plan["kv_base"] + n].tobytes())
        for name, v in (("status", status.value), ("err_pc", pc), ("argmax", m.regs[R.ISA_REG["argmax"].value]),
                        ("cycles", cycles)):
            for off, w in self.map[name].encode(v):
                self.regs[off] = w
        self.runs += 1

    def write_register(self, off, value):
        assert self.exclusive, "register access needs the CU opened exclusively"
        assert 0 <= value < 1 << 32 and off % 4 == 0
        self.writes.append((off, value))
        if off == R.CTRL:
            if value & R.AP_START and self.regs[R.CTRL] & R.AP_IDLE:
                self.start()
                self.regs[R.CTRL] = R.AP_IDLE | R.AP_DONE | R.AP_READY
                if self.regs.get(R.IP_IER, 0) & R.IRQ_DONE:
                    self.regs[R.IP_ISR] = self.regs.get(R.IP_ISR, 0) | R.IRQ_DONE
        elif off == R.IP_ISR:
            self.regs[R.IP_ISR] = self.regs.get(R.IP_ISR, 0) ^ value
        else:
            self.regs[off] = value

    def read_register(self, off):
        v = self.regs.get(off, 0)
        if off == R.CTRL:
            self.regs[R.CTRL] = v & ~(R.AP_DONE | R.AP_READY)       # clear on read
        return v


def fake_pyxrt(board: FakeBoard) -> types.ModuleType:
    x = types.ModuleType("pyxrt")

    class uuid:
        def __init__(self, s):
            self.s = s

        def to_string(self):
            return self.s or "00000000-0000-0000-0000-000000000000"

    class xrt_info_device:
        name, bdf, dynamic_regions = "name", "bdf", "dynamic_regions"

    class xclBOSyncDirection:
        XCL_BO_SYNC_BO_TO_DEVICE, XCL_BO_SYNC_BO_FROM_DEVICE = "to", "from"

    class xclbin:
        def __init__(self, path):
            with open(path, "rb") as f:
                assert f.read(8) == b"xclbin2\0"
            self.path = path

        def get_uuid(self):
            return uuid(UUID)

        def get_kernels(self):
            k = types.SimpleNamespace(get_name=lambda: KERNEL, get_num_args=lambda: len(board.map.args))
            return [k]

    class device:
        def __init__(self, i):
            if not 0 <= i < board.cards:
                raise RuntimeError(f"No such device index {i}")
            self.i = i

        def get_info(self, key):
            return {"name": "xilinx_u280_gen3x16_xdma_base_1", "bdf": f"0000:{0x3b + self.i:02x}:00.1",
                    "dynamic_regions": json.dumps({"dynamic_regions": [
                        {"xclbin_uuid": board.uuid, "compute_units": [{"name": f"{KERNEL}:{KERNEL}_1"}]}]})}[key]

        def get_xclbin_uuid(self):
            return uuid(board.uuid)

        def load_xclbin(self, xb):
            board.uuid = UUID
            return xb.get_uuid()

    class kernel:
        exclusive, shared = "exclusive", "shared"

        def __init__(self, dev, u, name, mode=None):
            if name != KERNEL or u.to_string() != board.uuid:
                raise RuntimeError(f"No such compute unit {name} in xclbin {u.to_string()}")
            board.exclusive = mode == kernel.exclusive

        def group_id(self, i):
            return board.group_id(i)

    if board.bind_registers:
        kernel.write_register = lambda self, off, v: board.write_register(off, v)
        kernel.read_register = lambda self, off: board.read_register(off)

    class bo:
        normal = "normal"

        def __init__(self, dev, size, flags, group):
            assert flags == bo.normal
            self.size, self.group = size, group
            self.host, self.dev = bytearray(size), bytearray(size)
            base = board.next.get(group, BANK_BASE + group * (1 << 32))
            self.addr = base
            board.next[group] = base + -(-size // 4096) * 4096
            board.bos.append(self)

        def address(self):
            return self.addr

        def write(self, data, seek):
            b = np.asarray(data).view(np.uint8).tobytes()
            assert seek + len(b) <= self.size
            self.host[seek:seek + len(b)] = b

        def read(self, size, skip):
            assert skip + size <= self.size
            return np.frombuffer(bytes(self.host[skip:skip + size]), dtype=np.int8)   # pyxrt: array of char

        def sync(self, direction, size, offset):
            src, dst = (self.host, self.dev) if direction == "to" else (self.dev, self.host)
            dst[offset:offset + size] = src[offset:offset + size]

    x.uuid, x.xrt_info_device, x.xclBOSyncDirection = uuid, xrt_info_device, xclBOSyncDirection
    x.xclbin, x.device, x.kernel, x.bo = xclbin, device, kernel, bo
    x.enumerate_devices = lambda: board.cards
    return x


def _compile_tiny(tmp_path_factory, hw):
    from flightllm.compiler.artifact import Artifact
    from flightllm.compiler.compile import compile_model
    from flightllm.hw.params import get_preset

    d = tmp_path_factory.mktemp("xrt")
    g = write_tiny_gguf(d / "tiny.gguf", qtype="Q4_1", embd_qtype="Q8_0")
    compile_model(g, d / "art", "native", get_preset(hw), progress=False)
    return Artifact(d / "art")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _compile_tiny(tmp_path_factory, "sim")


@pytest.fixture(scope="module")
def tiny_u280(tmp_path_factory):
    return _compile_tiny(tmp_path_factory, "u280")


@pytest.fixture
def no_pyxrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyxrt", None)         # `import pyxrt` raises ImportError


def _xclbin(path, size=4096, magic=b"xclbin2\0"):
    b = bytearray(size)
    b[:8] = magic
    b[304:312] = size.to_bytes(8, "little")                 # axlf_header.m_length
    b[352:352 + 35] = b"xilinx_u280_gen3x16_xdma_1_202211_1"
    path.write_bytes(bytes(b))
    return path


# -- the clear errors --------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["devices"], ["generate", "--backend", "xrt", "--prompt", "hi"],
                                  ["perplexity", "--backend", "xrt", "--text", __file__]])
def test_without_pyxrt_one_clear_line(argv, no_pyxrt, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pyxrt not importable" in err and "Traceback" not in err


def test_generate_xrt_fails_before_compiling(no_pyxrt, capsys):
    """No --artifact: the backend is checked before SmolLM2 would be compiled into the cache."""
    import os
    from pathlib import Path

    assert main(["generate", "--backend", "xrt", "--prompt", "hi"]) == 2
    assert "compiling" not in capsys.readouterr().err
    cache = Path(os.environ["FLIGHTLLM_CACHE"])
    assert not cache.is_dir() or not any(cache.iterdir())


def test_flash_checks_the_file_before_xrt(no_pyxrt, tmp_path, capsys):
    assert main(["flash", "--xclbin", str(tmp_path / "none.xclbin")]) == 2
    assert "no such xclbin file" in capsys.readouterr().err
    (tmp_path / "bad.xclbin").write_bytes(b"\x7fELF" + bytes(1000))
    assert main(["flash", "--xclbin", str(tmp_path / "bad.xclbin")]) == 2
    err = capsys.readouterr().err
    assert "not an xclbin" in err and len(err.strip().splitlines()) == 1
    short = _xclbin(tmp_path / "short.xclbin")
    short.write_bytes(short.read_bytes()[:2000])
    assert main(["flash", "--xclbin", str(short)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["flash", "--xclbin", str(_xclbin(tmp_path / "ok.xclbin"))]) == 2    # a good file: then pyxrt
    assert "pyxrt not importable" in capsys.readouterr().err


def test_help_explains(capsys):
    for cmd in ("flash", "devices"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "XRT" in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "xrt" in capsys.readouterr().out


def test_no_card_no_xclbin(monkeypatch, tiny, capsys):
    board = FakeBoard(tiny.params, tiny, cards=0)
    monkeypatch.setitem(sys.modules, "pyxrt", fake_pyxrt(board))
    assert main(["devices"]) == 2
    assert "no U280 found by XRT" in capsys.readouterr().err
    assert main(["generate", "--backend", "xrt", "--artifact", str(tiny.path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no U280 found by XRT" in err and len(err.strip().splitlines()) == 1
    board.cards, board.uuid = 1, ""
    assert main(["generate", "--backend", "xrt", "--artifact", str(tiny.path), "--prompt", "hi"]) == 2
    assert "no xclbin loaded on device 0" in capsys.readouterr().err
    board.uuid, board.bind_registers = UUID, False
    monkeypatch.setitem(sys.modules, "pyxrt", fake_pyxrt(board))
    assert main(["generate", "--backend", "xrt", "--artifact", str(tiny.path), "--prompt", "hi"]) == 2
    assert "binds neither" in capsys.readouterr().err


def test_devices_and_flash_on_the_fake(monkeypatch, tiny, tmp_path, capsys):
    board = FakeBoard(tiny.params, tiny, cards=2, loaded=False)
    monkeypatch.setitem(sys.modules, "pyxrt", fake_pyxrt(board))
    assert main(["devices"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("[0] 0000:3b:00.1") and "no xclbin loaded" in out[0]
    assert main(["flash", "--xclbin", str(_xclbin(tmp_path / "k.xclbin")), "--device", "1"]) == 0
    out = capsys.readouterr().out
    assert f"xclbin {UUID}" in out and KERNEL in out and "not xilinx" not in out
    assert main(["devices", "--json"]) == 0
    devs = json.loads(capsys.readouterr().out)
    assert devs[0]["xclbin"] == UUID and devs[0]["kernels"] == [f"{KERNEL}:{KERNEL}_1"]
    assert main(["flash", "--xclbin", str(tmp_path / "k.xclbin"), "--device", "5"]) == 2
    assert "no U280 found by XRT at device index 5" in capsys.readouterr().err


# -- the device on the fake board ------------------------------------------------------
def _devices(tiny, **kw):
    from flightllm.runtime.device import GoldenDevice
    from flightllm.runtime.xrt import XrtDevice

    board = FakeBoard(tiny.params, tiny, **kw)
    dev = XrtDevice(pyxrt=fake_pyxrt(board))
    return board, dev, GoldenDevice(weight_cache=False)


def _load_and_prefill(dev, art, ids):
    dev.load(art)
    dev.write_tokens(0, ids)
    dev.write_reg("POS", 0)
    dev.write_reg("LEN", len(ids))
    dev.start("prefill")
    dev.wait()


def test_buffers_in_their_banks_and_the_pointer_arguments(tiny):
    board, dev, _ = _devices(tiny)
    _load_and_prefill(dev, tiny, [1, 2])    # a run sets the instr pointer (load sets the channels')
    rm = register_map(tiny.params)
    C = tiny.params.weight_channels
    assert len(board.bos) == C + 1 and board.exclusive
    for i, r in enumerate(rm.args):
        if r.kind != "pointer":
            continue
        addr = board.arg(r.name)
        bo, off = board.locate(addr, 1, board.group_id(i))      # in its argument's bank
        # a channel pointer is its buffer; instr points at the program run, in the instr buffer
        assert off == (dev.prog["prefill"][0] if r.port == "instr" else 0)
    # the scalar arguments the load sets are the memory map's
    for name, v in {**dev.mm.args(), "max_seq": dev.plan["max_seq"]}.items():
        assert board.arg(name) == v
    # the weights reached the device side (written and synced) at each channel's pointer
    for c in range(C):
        img = tiny.read(f"weights/ch{c:02d}.bin")
        assert board.mem(f"ch{c:02d}", board.arg(f"ch{c:02d}"), len(img)) == img


def test_register_writes_are_the_kernel_drivers(tiny):
    """The writes of a run on XRT: exactly those KernelDriver makes (the rtl backend's)."""
    from flightllm.runtime.kernel import KernelDevice

    board, dev, _ = _devices(tiny)
    _load_and_prefill(dev, tiny, [1, 2, 3])

    class Recorder:                 # a KernelBus that records, with the board's addresses
        def __init__(self):
            self.writes, self.addrs = [], iter(bo.addr for bo in board.bos)

        def alloc(self, port, size):
            return next(self.addrs)

        def write_mem(self, port, addr, data):
            pass

        def read_mem(self, port, addr, n):
            return bytes(n)

        def write32(self, off, v):
            self.writes.append((off, v))

        def read32(self, off):
            return {R.CTRL: R.AP_IDLE | R.AP_DONE, R.IP_ISR: R.IRQ_DONE}.get(off, 0)

        def wait_interrupt(self, max_cycles):
            return True

    rec = Recorder()
    _load_and_prefill(KernelDevice(rec, tiny.params), tiny, [1, 2, 3])
    assert board.writes == rec.writes
    assert (R.CTRL, R.AP_START) in board.writes and board.runs == 1


@pytest.mark.parametrize("hw", ["sim", "u280"])
def test_xrt_device_generates_what_golden_does(hw, request):
    """The fake board's kernel is the golden model behind the memory map: the same tokens,
    bit-identical logits and KV state (sim: 2 channels; u280: 32 banks, the board's layout)."""
    from flightllm.runtime.driver import Driver

    tiny = request.getfixturevalue("tiny" if hw == "sim" else "tiny_u280")

    board, dev, gold = _devices(tiny)
    a, b = Driver(tiny, dev), Driver(tiny, gold)
    prompt = [5, 17, 42, 9]
    got = list(a.generate(prompt, 6, stop_ids=()))
    want = list(b.generate(prompt, 6, stop_ids=()))
    assert got == want and len(got) == 6 and board.runs == 6
    la, lb = a.prefill([3, 4], all_logits=True), b.prefill([3, 4], all_logits=True)
    assert np.array_equal(la.view(np.uint32), lb.view(np.uint32))
    kv_ch, kv_space = dev.read_kv()
    plan, m = gold.plan, gold.machine
    base, n = plan["kv_base"], plan["kv_channel_bytes"]
    assert kv_ch == [bytes(ch[base:base + n]) for ch in m.channels] and kv_space == m.kv.tobytes()


def test_a_fault_comes_back_as_its_status(tiny):
    """A program without its END: the model ends it with a fault; the host reads the status."""
    from flightllm.compiler.schedule import PROGRAM_FILES

    board, dev, _ = _devices(tiny)
    dev.load(tiny)
    image = tiny.read(PROGRAM_FILES["decode"])
    assert decode_program(image)[-1].op.name == "END"
    dev.write_reg("POS", 0)
    dev.write_reg("LEN", 1)
    st = dev.run_program(image[:-WORD_BYTES])
    assert st["status"] == Status.PAST_END.value and st["err_pc"] == len(image) // WORD_BYTES - 1


@pytest.mark.xrt
def test_on_a_board(tmp_path_factory):
    """On a U280 with a flightllm xclbin of the u280 preset loaded: the tiny model compiled
    for u280 generates what the golden model does (skipped without pyxrt, a card or an xclbin)."""
    pytest.importorskip("pyxrt", reason="needs XRT (pyxrt) and a U280 with a flightllm xclbin")
    from flightllm.runtime.driver import Driver
    from flightllm.runtime.xrt import XrtError, list_devices

    try:
        devs = list_devices()
    except XrtError as e:
        pytest.skip(str(e))
    if not devs or not devs[0]["xclbin"]:
        pytest.skip("no U280 with an xclbin loaded (flightllm flash --xclbin FILE)")
    art = _compile_tiny(tmp_path_factory, "u280")
    prompt = [5, 17, 42, 9]
    got = list(Driver(art, "xrt").generate(prompt, 6, stop_ids=()))
    assert got == list(Driver(art, "golden").generate(prompt, 6, stop_ids=()))
