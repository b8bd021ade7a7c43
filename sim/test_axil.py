"""cocotb RTL test of the ``s_axi_control`` slave (hw/axil.py) under Verilator, with
``cocotbext.axi.AxiLiteMaster`` as the host and random pauses on every channel
(sim/axil_tb.py). One small build (``sim_build/sim-control-<hash>``) of the ``sim`` preset's map.
"""

import json

import pytest

from flightllm.hw.params import get_preset
from flightllm.sim import rtl

PARAMS = get_preset("sim")


@pytest.mark.rtl
@pytest.mark.parametrize("stall", [0.0, 0.4])
def test_control_slave_registers(stall):
    tag = f"stall{int(stall * 100)}"
    stim = rtl.build_dir(PARAMS, rtl.AXIL) / f"run-{tag}" / "stimuli.json"
    stim.parent.mkdir(parents=True, exist_ok=True)
    stim.write_text(json.dumps({"params": PARAMS.to_dict(), "seed": 11, "stall": stall}))
    rtl.run(PARAMS, "axil_regs", stim, tag, test_module="flightllm.sim.axil_tb", design=rtl.AXIL)
