"""The ``xrt`` backend: the kernel on an Alveo U280 through XRT's Python binding (``pyxrt``).

:class:`XrtBus` is a :class:`~flightllm.runtime.kernel.KernelBus` on a board:

* the xclbin: one already on the card (``flightllm flash``), or loaded by the bus when it is
  given a file (``FLIGHTLLM_XRT_XCLBIN`` for the CLI);
* registers: ``pyxrt.kernel(device, uuid, "flightllm_kernel", pyxrt.kernel.exclusive)``, whose
  ``write_register`` / ``read_register`` reach ``s_axi_control`` (exclusive CU access is what
  XRT requires for that). XRT 2.15 deprecated them in favour of ``xrt::ip`` and some pyxrt
  builds no longer bind them: the bus then uses ``pyxrt.ip`` where the binding has it, and
  otherwise stops with one line saying so;
* memory: one ``pyxrt.bo`` per :meth:`alloc`, in the memory bank of the kernel argument of
  that m_axi port (``kernel.group_id(i)``, ``i`` the argument's index in
  :mod:`flightllm.hw.regmap`'s argument order, which is the order the generated kernel.xml
  lists them in), its device address (``bo.address()``) being what the host writes into the
  pointer argument; ``write_mem`` / ``read_mem`` are ``bo.write`` + ``sync`` to the device and
  ``sync`` from the device + ``bo.read`` of just the bytes asked for;
* the interrupt: polled. The kernel is started by a register write (``ap_start``), not
  through XRT's scheduler, so ``run.wait()`` has no run to wait for, and pyxrt binds no
  ``xrt::ip::interrupt``. :meth:`XrtBus.wait_interrupt` reads ``IP_ISR`` until its done bit
  is set (the interrupt's own source, enabled by the driver; reading it does not clear it,
  unlike ``CTRL``'s ap_done, which the driver reads afterwards), with a timeout of
  ``max(2 s, 4 x max_cycles at the clock)`` (the kernel's watchdog ends a stuck run
  long before).

:class:`XrtDevice` is :class:`~flightllm.runtime.kernel.KernelDevice` on it: the same
register-level driver, memory map, logits and KV read-back as the ``rtl`` backend.

Without pyxrt, without a card, without an xclbin on it, or with an xclbin that has no
``flightllm_kernel`` (or one of another preset), every entry point raises :class:`XrtError`
(an ``OSError``: the CLI prints its one line and exits with 2).

Environment (the ``--backend xrt`` of generate / chat / perplexity): ``FLIGHTLLM_XRT_DEVICE``
(card index, default 0), ``FLIGHTLLM_XRT_XCLBIN`` (load this xclbin first; default: use the
one already on the card).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ..hw import regmap as R
from ..hw.kernel import KERNEL_NAME             # the kernel's name in the xclbin (package_xo's)
from ..hw.params import HwParams
from ..hw.regmap import register_map
from .kernel import KernelDevice

__all__ = ["XrtError", "XrtBus", "XrtDevice", "KERNEL_NAME", "XCLBIN_MAGIC", "import_pyxrt",
           "check_xclbin", "list_devices", "flash", "add_cli"]

#: first 8 bytes of every xclbin (struct axlf's m_magic, xclbin.h)
XCLBIN_MAGIC = b"xclbin2\0"
#: struct axlf: m_magic[8], m_signature_length, reserved[28], m_keyBlock[256], m_uniqueId,
#: then axlf_header: m_length (u64) ... m_platformVBNV[64] at +48 of the header
_AXLF_HEADER = 8 + 4 + 28 + 256 + 8
_VBNV = _AXLF_HEADER + 48
#: the platform the Makefile links for (DESIGN.md, U280 facts)
PLATFORM = "xilinx_u280_gen3x16_xdma_1_202211_1"

_NO_PYXRT = ("xrt backend: pyxrt not importable (install XRT 2.15 and source /opt/xilinx/xrt/setup.sh, "
             "which puts pyxrt on PYTHONPATH)")


class XrtError(OSError):
    """XRT, a card or an xclbin is missing or unusable (one line: what and what to do)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def import_pyxrt():
    """The ``pyxrt`` module, or :class:`XrtError` naming what is missing."""
    try:
        import pyxrt
    except ImportError:
        raise XrtError(_NO_PYXRT) from None
    return pyxrt


def check_xclbin(path) -> dict:
    """Check ``path`` is an xclbin before XRT sees it: it exists, starts with ``xclbin2``
    and is as long as its header says. ``{"path", "bytes", "platform"}`` (the platform VBNV
    from the header, '' when it does not decode); ``ValueError`` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such xclbin file (make bitstream writes one on a build host with Vitis)")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(_VBNV + 64)
    if not head.startswith(XCLBIN_MAGIC):
        raise ValueError(f"{p}: not an xclbin (it starts with {head[:8]!r}, an xclbin with {XCLBIN_MAGIC!r})")
    if len(head) < _VBNV + 64:
        raise ValueError(f"{p}: truncated xclbin ({size} bytes, shorter than its header)")
    length = int.from_bytes(head[_AXLF_HEADER:_AXLF_HEADER + 8], "little")
    if length != size:
        raise ValueError(f"{p}: its header says {length} bytes, the file has {size} (truncated or corrupt)")
    vbnv = head[_VBNV:_VBNV + 64].split(b"\0", 1)[0]
    platform = vbnv.decode("ascii") if vbnv.isascii() and vbnv.decode("ascii").isprintable() else ""
    return {"path": p, "bytes": size, "platform": platform}


def _info(dev, pyxrt, key: str) -> str:
    try:
        return str(dev.get_info(getattr(pyxrt.xrt_info_device, key)))
    except Exception:               # noqa: BLE001 (a field this XRT / card does not report)
        return "?"


def _uuid_str(uuid) -> str:
    s = uuid.to_string() if hasattr(uuid, "to_string") else str(uuid)
    return "" if not s.strip("0-") else s


def _loaded_kernels(dev, pyxrt) -> list:
    """Names of the compute units of the xclbin on ``dev`` (from XRT's dynamic_regions JSON)."""
    try:
        regions = json.loads(dev.get_info(pyxrt.xrt_info_device.dynamic_regions))
    except Exception:               # noqa: BLE001 (older XRT: not reported)
        return []
    names = []
    for reg in regions.get("dynamic_regions", []) if isinstance(regions, dict) else []:
        for cu in reg.get("compute_units", []):
            if cu.get("name"):
                names.append(cu["name"])
    return names


def _open(pyxrt, index: int):
    """``pyxrt.device(index)``, or :class:`XrtError` saying no card is there."""
    try:
        return pyxrt.device(int(index))
    except Exception as e:          # noqa: BLE001 (pyxrt raises RuntimeError and others)
        raise XrtError(f"xrt backend: no U280 found by XRT at device index {index} ({e}); "
                       f"`xbutil examine` lists the cards XRT sees") from None


def list_devices(pyxrt=None) -> list:
    """What XRT sees: ``[{"index", "name", "bdf", "xclbin", "kernels"}]`` (xclbin '' when none)."""
    pyxrt = pyxrt or import_pyxrt()
    found = []
    count = None
    if hasattr(pyxrt, "enumerate_devices"):
        try:
            count = int(pyxrt.enumerate_devices())
        except Exception:           # noqa: BLE001
            count = None
    i = 0
    while count is None or i < count:
        try:
            dev = pyxrt.device(i)
        except Exception:           # noqa: BLE001 (no card at this index: the end of the list)
            break
        try:
            uuid = _uuid_str(dev.get_xclbin_uuid())
        except Exception:           # noqa: BLE001
            uuid = ""
        found.append({"index": i, "name": _info(dev, pyxrt, "name"), "bdf": _info(dev, pyxrt, "bdf"),
                      "xclbin": uuid, "kernels": _loaded_kernels(dev, pyxrt) if uuid else []})
        i += 1
    return found


def flash(xclbin, index: int = 0, pyxrt=None) -> dict:
    """Load ``xclbin`` on card ``index``; ``{"index", "name", "bdf", "xclbin" (uuid), "kernels",
    "platform"}``. The file is checked before XRT is touched."""
    info = check_xclbin(xclbin)
    pyxrt = pyxrt or import_pyxrt()
    dev = _open(pyxrt, index)
    try:
        xb = pyxrt.xclbin(str(info["path"]))
        uuid = dev.load_xclbin(xb)
    except Exception as e:          # noqa: BLE001
        raise XrtError(f"xrt: loading {info['path']} on device {index} failed: {e}") from None
    try:
        kernels = [k.get_name() for k in xb.get_kernels()]
    except Exception:               # noqa: BLE001
        kernels = []
    return {"index": index, "name": _info(dev, pyxrt, "name"), "bdf": _info(dev, pyxrt, "bdf"),
            "xclbin": _uuid_str(uuid), "kernels": kernels, "platform": info["platform"]}


class XrtBus:
    """A :class:`~flightllm.runtime.kernel.KernelBus` on a U280 through pyxrt (module docstring).

    Parameters
    ----------
    params : HwParams
        The hardware the xclbin was built for (the register map's pointer arguments).
    device : int
        XRT card index.
    xclbin : path, optional
        Load this xclbin first (default: use the one already on the card).
    pyxrt : module, optional
        The binding (default: ``import pyxrt``; tests pass a fake).
    """

    def __init__(self, params: HwParams, device: int = 0, xclbin=None, pyxrt=None):
        self.params = params
        self.map = register_map(params)
        self.clock_hz = params.clock_mhz * 1e6
        if xclbin is not None:
            check_xclbin(xclbin)
        self.x = x = pyxrt or import_pyxrt()
        self.dev = _open(x, device)
        self.index = device
        xb = None
        if xclbin is not None:
            try:
                xb = x.xclbin(str(xclbin))
                self.uuid = self.dev.load_xclbin(xb)
            except Exception as e:  # noqa: BLE001
                raise XrtError(f"xrt backend: loading {xclbin} on device {device} failed: {e}") from None
        else:
            self.uuid = self.dev.get_xclbin_uuid()
            if not _uuid_str(self.uuid):
                raise XrtError(f"xrt backend: no xclbin loaded on device {device} (flightllm flash --xclbin "
                               f"FILE --device {device}, or set FLIGHTLLM_XRT_XCLBIN)")
        if xb is not None:
            self._check_kernel(xb, xclbin)
        try:
            self.kernel = x.kernel(self.dev, self.uuid, KERNEL_NAME, x.kernel.exclusive)
        except Exception as e:      # noqa: BLE001
            raise XrtError(f"xrt backend: the xclbin on device {device} has no {KERNEL_NAME} available for "
                           f"exclusive use ({e}); flash one from `make bitstream`, and close other users") from None
        if hasattr(self.kernel, "write_register") and hasattr(self.kernel, "read_register"):
            self.regs = self.kernel
        elif hasattr(x, "ip"):
            self.regs = x.ip(self.dev, self.uuid, KERNEL_NAME)
        else:
            raise XrtError("xrt backend: this pyxrt binds neither kernel.read_register/write_register nor "
                           "xrt::ip (XRT 2.15 deprecated the former); the register-level driver needs one of them")
        self.arg_index = {r.port: i for i, r in enumerate(self.map.args) if r.kind == "pointer"}
        self.groups = {}
        self.bos = {}                       # port -> [(address, size, bo)]

    def _check_kernel(self, xb, path):
        try:
            kernels = {k.get_name(): k for k in xb.get_kernels()}
        except Exception:           # noqa: BLE001 (metadata this binding does not give: XRT checks later)
            return
        if KERNEL_NAME not in kernels:
            raise XrtError(f"xrt backend: {path} has no kernel {KERNEL_NAME} (it has {', '.join(kernels) or 'none'})")
        try:
            n = int(kernels[KERNEL_NAME].get_num_args())
        except Exception:           # noqa: BLE001
            return
        if n != len(self.map.args):
            raise XrtError(f"xrt backend: {path}'s {KERNEL_NAME} has {n} arguments, hardware "
                           f"{self.params.name!r} has {len(self.map.args)} (an xclbin of another preset)")

    # -- memory ---------------------------------------------------------------------
    def _group(self, port: str) -> int:
        if port not in self.groups:
            if port not in self.arg_index:
                raise ValueError(f"no m_axi port {port!r}; ports: {', '.join(self.arg_index)}")
            self.groups[port] = self.kernel.group_id(self.arg_index[port])
        return self.groups[port]

    def alloc(self, port: str, size: int) -> int:
        size = -(-max(int(size), 4096) // 4096) * 4096
        group = self._group(port)
        try:
            bo = self.x.bo(self.dev, size, self.x.bo.normal, group)
        except Exception as e:      # noqa: BLE001
            raise XrtError(f"xrt backend: cannot allocate {size} bytes for m_axi {port} in memory bank "
                           f"{group}: {e}") from None
        addr = int(bo.address())
        self.bos.setdefault(port, []).append((addr, size, bo))
        return addr

    def _bo(self, port: str, addr: int, n: int):
        for base, size, bo in self.bos.get(port, ()):
            if base <= addr and addr + n <= base + size:
                return bo, addr - base
        raise ValueError(f"m_axi {port}: bytes {addr:#x}..{addr + n:#x} are in no buffer allocated for it")

    def write_mem(self, port, addr, data):
        data = bytes(data)
        if not data:
            return
        bo, off = self._bo(port, int(addr), len(data))
        bo.write(np.frombuffer(data, dtype=np.uint8), off)
        bo.sync(self.x.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE, len(data), off)

    def read_mem(self, port, addr, n):
        n = int(n)
        if n == 0:
            return b""
        bo, off = self._bo(port, int(addr), n)
        bo.sync(self.x.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE, n, off)
        return np.asarray(bo.read(n, off)).view(np.uint8).tobytes()

    # -- registers --------------------------------------------------------------------
    def write32(self, offset, value):
        self.regs.write_register(int(offset), int(value) & 0xFFFFFFFF)

    def read32(self, offset):
        return int(self.regs.read_register(int(offset))) & 0xFFFFFFFF

    def wait_interrupt(self, max_cycles):
        """Poll IP_ISR's done bit (module docstring: why polling, why IP_ISR)."""
        deadline = time.monotonic() + max(2.0, 4 * max_cycles / self.clock_hz)
        pause = 0.0
        while True:
            if self.read32(R.IP_ISR) & R.IRQ_DONE:
                return True
            if time.monotonic() > deadline:
                return False
            if pause:
                time.sleep(pause)
            pause = min(1e-3, pause * 2 or 2e-6)

    def close(self):
        self.bos.clear()
        self.regs = self.kernel = None


class XrtDevice(KernelDevice):
    """The kernel on a U280 behind the Device protocol (``--backend xrt``).

    A missing pyxrt or card fails when the device is made, before any artifact is loaded;
    the xclbin and its kernel are checked then too when ``params`` is given, else at
    :meth:`load` (``params`` None: the artifact's hardware, which must be the xclbin's).
    """

    name = "xrt"

    def __init__(self, params: HwParams | None = None, device: int | None = None, xclbin=None, pyxrt=None):
        self.params = params
        self.device_index = int(os.environ.get("FLIGHTLLM_XRT_DEVICE", 0) if device is None else device)
        self.xclbin = (os.environ.get("FLIGHTLLM_XRT_XCLBIN") or None) if xclbin is None else xclbin
        self.pyxrt = pyxrt or import_pyxrt()
        self.bus = None
        if params is not None:
            self._connect()
        else:                       # fail now if there is no card; the bus needs the artifact's params
            _open(self.pyxrt, self.device_index)

    def _connect(self):
        self.bus = XrtBus(self.params, self.device_index, self.xclbin, self.pyxrt)
        KernelDevice.__init__(self, self.bus, self.params)

    def load(self, artifact):
        if self.bus is None:                # the xclbin is the artifact's hardware
            self.params = artifact.params
            self._connect()
        super().load(artifact)

    def close(self):
        if self.bus is not None:
            self.bus.close()


# -- the CLI: flightllm devices, flightllm flash ------------------------------------------
def _cmd_devices(args) -> int:
    devs = list_devices()
    if not devs:
        raise XrtError("no U280 found by XRT (pyxrt sees no card; `xbutil examine` lists what XRT sees)")
    if args.json:
        print(json.dumps(devs, indent=1))
        return 0
    for d in devs:
        loaded = f"xclbin {d['xclbin']}" if d["xclbin"] else "no xclbin loaded"
        kern = f", kernels: {', '.join(d['kernels'])}" if d["kernels"] else ""
        note = "" if "u280" in d["name"].lower() else "  (not a U280)"
        print(f"[{d['index']}] {d['bdf']}  {d['name']}  {loaded}{kern}{note}")
    return 0


def _cmd_flash(args) -> int:
    r = flash(args.xclbin, args.device)
    plat = r["platform"]
    warn = f" (built for {plat}, not {PLATFORM})" if plat and plat != PLATFORM else ""
    print(f"loaded {args.xclbin} on device {r['index']} ({r['bdf']} {r['name']}): xclbin {r['xclbin']}, "
          f"kernels: {', '.join(r['kernels']) or '?'}{warn}")
    return 0


def add_cli(sub) -> None:
    d = sub.add_parser("devices", help="list the FPGA cards XRT sees and the xclbin loaded on each",
                       description="List what XRT (pyxrt) sees: each card's index, PCIe BDF and name, the UUID "
                                   "of the xclbin loaded on it and its compute units. Needs XRT (source "
                                   "/opt/xilinx/xrt/setup.sh); without it, or without a card, one line says "
                                   "what is missing and the exit code is 2.")
    d.add_argument("--json", action="store_true", help="print the list as JSON")
    d.set_defaults(func=_cmd_devices)
    f = sub.add_parser("flash", help="load an xclbin (from `make bitstream`) onto a card",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load FILE onto card --device through XRT, after checking that it is an "
                                   "xclbin (its xclbin2 magic and length). The run commands then use the "
                                   f"loaded kernel: `flightllm generate --backend xrt ...` (the artifact must be "
                                   f"compiled for the hardware preset the xclbin was built for, --hw u280). "
                                   f"Without XRT or a card: one line saying what is missing, exit code 2.",
                       epilog="e.g. (the xclbin is the one `make bitstream` writes in its build directory)\n"
                              "  flightllm flash --xclbin out/bitstream-u280/flightllm_kernel.xclbin\n"
                              "  flightllm devices\n"
                              "  flightllm generate --backend xrt --artifact out/smollm2 --prompt Hello")
    f.add_argument("--xclbin", required=True, metavar="FILE", help="the .xclbin to load")
    f.add_argument("--device", type=int, default=0, metavar="N", help="XRT card index (default 0; see "
                                                                      "`flightllm devices`)")
    f.set_defaults(func=_cmd_flash)
