"""cocotb RTL tests of the AXI4 manager side (hw/axi.py) against cocotbext-axi's AxiRam.

One Verilated build per data width (``sim_build/sim-axi<bits>-axi-<hash>``) of
:class:`flightllm.sim.axi_top.AxiTestTop`: two :class:`~flightllm.hw.axi.BurstReader` behind a
:class:`~flightllm.hw.axi.ReadMux` and two :class:`~flightllm.hw.axi.BurstWriter` behind a
:class:`~flightllm.hw.axi.WriteMux`, on one port ``m_axi_*``. The case (:func:`make_case`):
random commands of 1..600 words at addresses across 4 KiB pages, partial write strobes;
the writers write their own regions while the readers read a third, then the readers read
back what was written (and around it); AxiRam pauses every channel at random and the
testbench stalls every command and data stream (sim/axi_tb.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from flightllm.hw.axi import AXI_PAGE_BYTES
from flightllm.hw.params import get_preset
from flightllm.sim import rtl
from flightllm.sim.axi_top import ADDR_BITS, READERS, WRITERS

MEM_BYTES = 1 << 20
#: memory regions: writer 0, writer 1, read-only
REGIONS = ((0, MEM_BYTES // 4), (MEM_BYTES // 4, MEM_BYTES // 2), (MEM_BYTES // 2, MEM_BYTES))


def params(data_bits):
    return dataclasses.replace(get_preset("sim"), name=f"sim-axi{data_bits}", hbm_port_bits=data_bits)


def random_commands(rng, n, bb, region, long=600):
    """``n`` commands ``(addr, beats)`` inside ``region``: one of ``long`` words starting two
    words before a 4 KiB boundary, the others 1..``long`` words (a third of them 1..3, a
    third up to 40), a sixth of them starting a few words before a 4 KiB boundary."""
    lo, hi = region
    out = [(lo + 3 * AXI_PAGE_BYTES - 2 * bb, long)]
    for _ in range(n - 1):
        kind = rng.random()
        beats = int(rng.integers(1, 4) if kind < 0.33 else rng.integers(4, 41) if kind < 0.66
                    else rng.integers(41, long + 1))
        if kind < 0.16 or kind > 0.9:
            page = int(rng.integers(lo // AXI_PAGE_BYTES + 1, hi // AXI_PAGE_BYTES))
            addr = page * AXI_PAGE_BYTES - int(rng.integers(1, 5)) * bb
        else:
            addr = int(rng.integers(lo, hi - beats * bb + 1)) // bb * bb
        addr = max(lo, min(addr, hi - beats * bb))
        out.append((addr, beats))
    return out


def make_case(data_bits, seed, n_cmds=16):
    """Stimuli and expectations (arrays): the initial memory, the writers' commands, words
    and strobes, the readers' commands and the words they must see in each phase, and the
    final memory."""
    rng = np.random.default_rng(seed)
    bb = data_bits // 8
    mem0 = rng.integers(0, 256, MEM_BYTES, dtype=np.uint8)
    mem = mem0.copy()
    arrays = {"mem0": mem0}
    written = []
    for k in range(len(WRITERS)):
        cmds = random_commands(rng, n_cmds, bb, REGIONS[k])
        beats = sum(n for _, n in cmds)
        data = rng.integers(0, 256, (beats, bb), dtype=np.uint8)
        strb = np.ones((beats, bb), bool)
        partial = rng.random(beats) < 0.15
        strb[partial] = rng.random((int(partial.sum()), bb)) < 0.5
        i = 0
        for a, n in cmds:
            for j in range(n):
                row = slice(a + j * bb, a + (j + 1) * bb)
                mem[row] = np.where(strb[i], data[i], mem[row])
                i += 1
        arrays[f"w_cmd{k}"] = np.array(cmds, np.int64)
        arrays[f"w_data{k}"] = data
        arrays[f"w_strb{k}"] = np.packbits(strb, axis=1, bitorder="little")
        written.append(cmds)

    def reads(cmds, image):
        rows = [image[a + j * bb: a + (j + 1) * bb] for a, n in cmds for j in range(n)]
        return np.array(cmds, np.int64).reshape(-1, 2), np.array(rows, np.uint8).reshape(-1, bb)

    for k in range(len(READERS)):
        arrays[f"ra_cmd{k}"], arrays[f"ra_exp{k}"] = reads(random_commands(rng, n_cmds, bb, REGIONS[2]), mem0)
        back = list(written[k]) + random_commands(rng, 3, bb, REGIONS[k])      # what was written, and around
        order = rng.permutation(len(back))
        arrays[f"rb_cmd{k}"], arrays[f"rb_exp{k}"] = reads([back[i] for i in order], mem)
    arrays["mem_final"] = mem
    return arrays


def save_case(path, arrays, data_bits, seed, stall=0.3, pause=0.25):
    meta = {"data_bits": data_bits, "addr_bits": ADDR_BITS, "mem_bytes": MEM_BYTES, "seed": seed,
            "stall": stall, "pause": pause, "max_burst": max(mb for mb, _ in READERS + WRITERS)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    tmp.replace(path)
    return path


@pytest.mark.rtl
@pytest.mark.parametrize("data_bits", [256, 512])
def test_axi_readers_writers_on_axiram(data_bits):
    """Random writes then read-back through the muxes against AxiRam with random pauses on
    every channel and stalls on every stream: every word, every done, the whole memory."""
    p = params(data_bits)
    tag, seed = "random", 3
    stim = rtl.build_dir(p, rtl.AXI) / f"run-{tag}" / "stimuli.npz"
    save_case(stim, make_case(data_bits, seed), data_bits, seed)
    rtl.run(p, "axi_case", stim, tag, test_module="flightllm.sim.axi_tb", seed=seed, design=rtl.AXI)
    res = json.loads(stim.with_name(stim.name + ".result.json").read_text())
    assert res["bursts"]["aw"] >= 2 * 16 and res["bursts"]["ar"] >= 4 * 16, res
