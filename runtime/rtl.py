"""The ``rtl`` backend: the generated kernel under Verilator, driven like the board.

:class:`RtlBus` is a :class:`~flightllm.runtime.kernel.KernelBus` on a simulation: the
kernel (``sim/rtl.py``'s ``KERNEL`` design, built once per parameter set) runs under
cocotb in a subprocess with :mod:`flightllm.sim.kernel_server`, which serves register
accesses (``cocotbext.axi.AxiLiteMaster``) and memory accesses (one ``AxiRam`` per m_axi
port, with random pauses on every channel: latency and backpressure) over a
:mod:`multiprocessing.connection`. :class:`RtlDevice` is
:class:`~flightllm.runtime.kernel.KernelDevice` on it: the same register-level driver the
``xrt`` backend uses.

The simulation starts when the first register or memory access follows the buffer
allocations (the memories' sizes are fixed then) and stops with :meth:`RtlBus.close` (or at
exit). ``FLIGHTLLM_RTL_PAUSE`` sets the pause probability (default 0.2), ``FLIGHTLLM_RTL_SEED``
its seed.
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading
from multiprocessing.connection import Listener

from ..hw.params import HwParams
from .kernel import KernelDevice

__all__ = ["RtlBus", "RtlDevice"]


class RtlBus:
    """A :class:`~flightllm.runtime.kernel.KernelBus` on the Verilated kernel (module docstring)."""

    def __init__(self, params: HwParams, pause: float | None = None, seed: int | None = None):
        self.params = params
        self.pause = float(os.environ.get("FLIGHTLLM_RTL_PAUSE", 0.2) if pause is None else pause)
        self.seed = int(os.environ.get("FLIGHTLLM_RTL_SEED", 0) if seed is None else seed)
        self.sizes = {}
        self.bases = {}
        self.conn = None
        self.thread = None
        self.error = None
        self.cycles = 0

    # -- allocation (before the simulation starts) ------------------------------------
    def alloc(self, port: str, size: int) -> int:
        if self.conn is not None:
            raise RuntimeError("RtlBus: memories are sized when the simulation starts; close() first")
        # every port has its own memory; its buffer starts at a page of its own (the ports' bases
        # differ and are not 0), so the kernel's base-address additions are exercised: a base
        # taken from the wrong argument, or none, reads the wrong bytes
        base = self.bases.setdefault(port, 4096 * (1 + len(self.bases)))
        self.sizes[port] = base + -(-max(size, 4096) // 4096) * 4096
        return base

    def _start(self):
        from ..sim import rtl

        ports = {"instr": 4096, **{f"ch{c:02d}": 4096 for c in range(self.params.weight_channels)}}
        ports.update(self.sizes)
        sdir, runner = rtl.build(self.params, design=rtl.KERNEL)
        key = secrets.token_hex(16)
        listener = Listener(("127.0.0.1", 0), authkey=key.encode())
        host, port = listener.address
        tdir = sdir.parent / (sdir.name + "-serve")
        tdir.mkdir(parents=True, exist_ok=True)
        env = {"FLIGHTLLM_KERNEL_SERVER": f"{host}:{port}|{key}"}

        def sim():
            try:
                runner.test(test_module="flightllm.sim.kernel_server", testcase="serve",
                            hdl_toplevel=rtl.KERNEL.top, build_dir=sdir, test_dir=tdir,
                            results_xml=str(tdir / "results.xml"), extra_env=env, seed=self.seed,
                            log_file=tdir / "sim.log")
            except BaseException as e:             # noqa: BLE001 (reported by the host side)
                self.error = e
            finally:
                if self.conn is None:              # never connected: unblock accept()
                    from multiprocessing.connection import Client
                    try:
                        Client((host, port), authkey=key.encode()).close()
                    except OSError:
                        pass

        self.thread = threading.Thread(target=sim, name="flightllm-rtl-sim", daemon=True)
        self.thread.start()
        conn = listener.accept()
        listener.close()
        try:
            from ..hw.control import UNIT_NAMES
            conn.send({"ports": ports, "pause": self.pause, "seed": self.seed, "units": UNIT_NAMES})
            msg = conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the kernel simulation did not start (log: {tdir / 'sim.log'})") from self.error
        if msg[0] != "ready":
            raise RuntimeError(f"the kernel simulation answered {msg!r}")
        self.conn, self.log = conn, tdir / "sim.log"
        atexit.register(self.close)

    def _call(self, *req):
        if self.conn is None:
            self._start()
        try:
            self.conn.send(req)
            status, value = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the kernel simulation ended unexpectedly (log: {self.log})") from self.error
        if status != "ok":
            raise RuntimeError(f"kernel simulation: {value}")
        return value

    # -- the KernelBus protocol -------------------------------------------------------
    def write32(self, offset, value):
        self._call("w32", int(offset), int(value))

    def read32(self, offset):
        return self._call("r32", int(offset))

    def write_mem(self, port, addr, data):
        self._call("wmem", port, int(addr), bytes(data))

    def read_mem(self, port, addr, n):
        return self._call("rmem", port, int(addr), int(n))

    def wait_interrupt(self, max_cycles):
        return self._call("wait", int(max_cycles))

    def cycle(self) -> int:
        return self._call("cycle")

    def trace(self, on: bool) -> None:
        """Start (clearing the records) or stop recording every instruction's issue and done."""
        self._call("trace", bool(on))

    def trace_records(self) -> list:
        """[(cycle, 'issue' | 'done', unit index, pc | None)] since the last ``trace(True)``."""
        return self._call("trace_get")

    def close(self):
        if self.conn is not None:
            try:
                self.cycles = self._call("quit")
            except RuntimeError:
                pass
            self.conn.close()
            self.conn = None
            self.thread.join(timeout=60)


class RtlDevice(KernelDevice):
    """The kernel under Verilator behind the Device protocol (``--backend rtl``)."""

    name = "rtl"

    def __init__(self, params: HwParams | None = None, pause: float | None = None, seed: int | None = None):
        self.params = params
        self._bus_args = (pause, seed)
        self.bus = None

    def load(self, artifact):
        if self.params is None:
            self.params = artifact.params
        if self.bus is not None:
            self.bus.close()
        self.bus = RtlBus(self.params, *self._bus_args)
        KernelDevice.__init__(self, self.bus, self.params)
        super().load(artifact)

    def close(self):
        if self.bus is not None:
            self.bus.close()
