"""Fast Verilator sweeps of the binary32 units of :mod:`flightllm.hw.fp32`.

A small C++ testbench, generated from the unit's signature, reads the operands from a
binary file (one little-endian ``uint64`` per data input port and operation), drives them
into the Verilated unit and writes the results the same way; numpy computes the expected
values and the test compares (the testbench only drives, it knows no arithmetic).

* A pipelined unit (no ``i_ready``) gets random bubbles with garbage on its data ports; the
  testbench checks that every ``o_valid`` comes exactly ``latency`` cycles after its
  operation and that no other ``o_valid`` appears.
* A ready/valid unit (``FSqrt``) gets random gaps on ``i_valid`` (held until accepted) and
  random stalls on ``o_ready``; the testbench checks that ``o_valid`` rises exactly
  ``cycles`` cycles after the acceptance, and fails if nothing moves for 1,000 cycles.

Builds go to ``sim_build/fp32/<name>-<hash>``, the hash over this file and the unit's
Verilog without its source locations: an edited design is rebuilt, an edited comment is
not. Data ports up to 64 bits only.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import time

import numpy as np
from amaranth.hdl import Shape
from amaranth.lib.wiring import In

from flightllm.sim.rtl import SIM_BUILD, verilator_env, waiver_args

__all__ = ["Sweep"]

HANDSHAKE = ("i_valid", "i_ready", "o_valid", "o_ready")

TB = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "verilated.h"
#include "V@TOP@.h"

static uint64_t rs;
static inline uint64_t rnd() { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }

int main(int argc, char** argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s in.bin out.bin n bubble_permille stall_permille seed\n", argv[0]);
        return 2;
    }
    const uint64_t n = strtoull(argv[3], nullptr, 10), LAT = @LAT@;
    const uint64_t bubble = strtoull(argv[4], nullptr, 10), stall = strtoull(argv[5], nullptr, 10);
    rs = strtoull(argv[6], nullptr, 10) * 0x9E3779B97F4A7C15ull | 1;
    std::vector<uint64_t> in(n * @NI@), out(n * @NO@);
    FILE* f = fopen(argv[1], "rb");
    if (!f || fread(in.data(), 8, in.size(), f) != in.size()) { fprintf(stderr, "cannot read %s\n", argv[1]); return 2; }
    fclose(f);
    VerilatedContext ctx;
    V@TOP@ t{&ctx};
    t.clk = 0; t.rst = 1; t.eval();
    for (int i = 0; i < 2; i++) { t.clk = 1; t.eval(); t.clk = 0; t.eval(); }
    t.rst = 0;
    uint64_t issued = 0, got = 0, errors = 0, cyc = 0;
    auto set_inputs = [&](const uint64_t* p) { @SET@ };
    auto get_outputs = [&](uint64_t* p) { @GET@ };
#if @HANDSHAKE@
    // one operation in flight: o_valid must rise LAT cycles after the acceptance
    bool have = false, busy = false, seen = false;
    uint64_t accepted = 0, last = 0;
    for (; got < n; ++cyc) {
        if (cyc - last > 1000) { fprintf(stderr, "no progress for 1000 cycles at operation %llu\n", (unsigned long long)got); errors++; break; }
        if (!have && issued < n && rnd() % 1000 >= bubble) have = true;
        t.i_valid = have;
        set_inputs(have ? &in[issued * @NI@] : nullptr);
        t.o_ready = rnd() % 1000 >= stall;
        t.clk = 0; t.eval();
        if (t.o_valid && !seen) { seen = true; if (!busy || cyc != accepted + LAT) errors++; }
        if (t.o_valid && t.o_ready) { get_outputs(&out[got * @NO@]); got++; busy = seen = false; last = cyc; }
        if (have && t.i_ready) {
            if (busy) errors++;
            busy = true; accepted = last = cyc; issued++; have = false;
        }
        t.clk = 1; t.eval();
    }
#else
    std::vector<uint64_t> when(n);
    for (; got < n; ++cyc) {
        if (issued == n && cyc > when[n - 1] + LAT) { errors += n - got; break; }    // results missing
        const bool v = issued < n && rnd() % 1000 >= bubble;
        t.i_valid = v;
        set_inputs(v ? &in[issued * @NI@] : nullptr);
        t.clk = 0; t.eval();
        if (t.o_valid) {
            if (got < issued && cyc == when[got] + LAT) { get_outputs(&out[got * @NO@]); got++; }
            else errors++;
        }
        if (v) when[issued++] = cyc;
        t.clk = 1; t.eval();
    }
    for (uint64_t i = 0; i < LAT + 4; ++i, ++cyc) {               // nothing after the last result
        t.i_valid = 0; t.clk = 0; t.eval();
        if (t.o_valid) errors++;
        t.clk = 1; t.eval();
    }
#endif
    f = fopen(argv[2], "wb");
    if (!f || fwrite(out.data(), 8, out.size(), f) != out.size()) { fprintf(stderr, "cannot write %s\n", argv[2]); return 2; }
    fclose(f);
    printf("cycles %llu timing_errors %llu\n", (unsigned long long)cyc, (unsigned long long)errors);
    return errors ? 1 : 0;
}
"""


class Sweep:
    """A Verilated unit with its generated testbench, built on first use.

    Parameters
    ----------
    name : str
        Top module name and build directory prefix.
    make : callable
        Returns a fresh unit (a component like those of :mod:`flightllm.hw.fp32`: fixed
        ``latency``, or ``cycles`` and ready/valid); called once for the interface and once
        for the Verilog.
    """

    def __init__(self, name: str, make):
        self.name, self.make = name, make
        dut = make()
        self.handshake = "i_ready" in dut.signature.members
        self.latency = dut.cycles if self.handshake else dut.latency
        ports = [(n, mem.flow == In, Shape.cast(mem.shape)) for n, mem in dut.signature.members.items()
                 if n not in HANDSHAKE]
        self.inputs = [(n, s) for n, is_in, s in ports if is_in]
        self.outputs = [(n, s) for n, is_in, s in ports if not is_in]
        dut._MustUse__silence = True           # only read for its interface; build() makes another
        self.exe = None

    def build(self) -> pathlib.Path:
        """Generate the Verilog; compile it with the testbench unless built before."""
        if self.exe is not None:
            return self.exe
        from amaranth.back import verilog

        if any(s.width > 64 for _, s in self.inputs + self.outputs):
            raise ValueError(f"{self.name}: the harness handles data ports up to 64 bits")
        v = verilog.convert(self.make(), name=self.name)
        h = hashlib.sha256(pathlib.Path(__file__).read_bytes())
        h.update("\n".join(ln for ln in v.splitlines() if "(* src =" not in ln).encode())
        self.bdir = SIM_BUILD / "fp32" / f"{self.name}-{h.hexdigest()[:10]}"
        if (self.bdir / "tb").exists():
            self.exe = self.bdir / "tb"
            return self.exe
        env = {**os.environ, **verilator_env()}
        self.bdir.mkdir(parents=True, exist_ok=True)
        (self.bdir / f"{self.name}.v").write_text(v)
        mask = lambda s: f"0x{(1 << s.width) - 1:x}ull"
        cpp = (TB.replace("@TOP@", self.name).replace("@LAT@", str(self.latency))
               .replace("@NI@", str(len(self.inputs))).replace("@NO@", str(len(self.outputs)))
               .replace("@HANDSHAKE@", str(int(self.handshake)))
               .replace("@SET@", " ".join(f"t.{n} = (p ? p[{i}] : rnd()) & {mask(s)};"
                                          for i, (n, s) in enumerate(self.inputs)))
               .replace("@GET@", " ".join(f"p[{i}] = (uint64_t)t.{n} & {mask(s)};"
                                          for i, (n, s) in enumerate(self.outputs))))
        (self.bdir / "tb.cpp").write_text(cpp)
        cmd = ["verilator", "--cc", "--exe", "--build", "-j", "1", "-Wall", *waiver_args(),
               "--x-assign", "0", "--x-initial", "0", "--top-module", self.name,
               "-Mdir", "obj", "-o", "../tb", "tb.cpp", f"{self.name}.v"]
        r = subprocess.run(cmd, cwd=self.bdir, env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"verilator build of {self.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        self.exe = self.bdir / "tb"
        return self.exe

    def run(self, inputs: dict, bubble: float = 0.3, stall: float = 0.3, seed: int = 1) -> dict:
        """Drive ``inputs`` (port name -> integer array, one entry per operation); return
        the outputs (port name -> int64 array, signed ports sign-extended). ``bubble``:
        probability of an idle input cycle, ``stall``: of ``o_ready`` low (FSqrt).
        ``self.rate`` is then the operations per second of the simulation."""
        exe = self.build()
        n = len(next(iter(inputs.values())))
        cols = [np.asarray(inputs[name]).astype(np.uint64) for name, _ in self.inputs]
        fin, fout = self.bdir / f"in-{os.getpid()}.bin", self.bdir / f"out-{os.getpid()}.bin"
        try:
            np.stack(cols, axis=1).tofile(fin)
            t0 = time.perf_counter()
            r = subprocess.run([str(exe), str(fin), str(fout), str(n), str(round(bubble * 1000)),
                                str(round(stall * 1000)), str(seed)], capture_output=True, text=True)
            self.rate = n / (time.perf_counter() - t0)
            if r.returncode:
                raise AssertionError(f"{self.name} testbench: {r.stdout.strip()} {r.stderr.strip()}")
            raw = np.fromfile(fout, np.uint64).reshape(n, len(self.outputs))
        finally:
            for p in (fin, fout):
                p.unlink(missing_ok=True)
        out = {}
        for i, (name, s) in enumerate(self.outputs):
            v = raw[:, i].astype(np.int64)
            if s.signed and s.width < 64:
                sb = np.int64(1) << (s.width - 1)
                v = (v ^ sb) - sb
            out[name] = v
        return out
