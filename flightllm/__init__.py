"""flightllm: a FlightLLM-style FPGA LLM inference accelerator generator.

Sub-packages (top-level folders of the repository):

``flightllm.hw``        hardware parameters, ISA, packed formats and the Amaranth RTL
``flightllm.compiler``  GGUF import, float reference, compression, packing, scheduling
``flightllm.runtime``   the Device protocol, the golden model and the host driver
``flightllm.sim``       cocotb testbenches of the RTL
"""

__version__ = "0.1.0"
