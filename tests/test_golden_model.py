"""SmolLM2 through the bit-exact golden model: generation and perplexity.

The native/u280 artifact (the default preset) is compiled once into the flightllm cache (``FLIGHTLLM_CACHE``,
default ~/.cache/flightllm; keyed by the code version) — the first run compiles it
(a few minutes), later runs reuse it.
"""

import math
from pathlib import Path

import numpy as np
import pytest

from flightllm.compiler.reference import FloatLlama, perplexity
from flightllm.runtime.driver import Driver

pytestmark = pytest.mark.model
TEXT = Path(__file__).resolve().parent.parent / "bench" / "data" / "gpl-3.0.txt"


@pytest.fixture(scope="module")
def smol_driver(smollm2_native_artifact):
    return Driver(smollm2_native_artifact)


def test_capital_of_france_greedy(smol_driver, smollm2, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The capital of France is")
    a = list(smol_driver.generate(ids, 6))
    b = list(smol_driver.generate(ids, 6))
    assert a == b
    assert smol_driver.tok.decode(a).startswith(" Paris")
    ref = FloatLlama(smollm2, max_seq=64).generate(ids, 2)
    assert a[:2] == ref[:2]


def test_golden_perplexity_close_to_float(smol_driver, smollm2, smollm2_tokenizer):
    ids = np.asarray(smollm2_tokenizer.encode(TEXT.read_text()[:2400]), dtype=np.int64)[:385]
    nll, n = smol_driver.nll_windows(ids, 128)
    golden = math.exp(nll / n)
    ref = perplexity(smollm2, ids, 128)
    assert n == ref["tokens"]
    # measured: golden 38.00 vs float 39.22 (-3.1% on this 385-token sample; the native weights
    # are the float reference's own): INT8 activations with per-group factors, the INT8 KV cache
    # and INT8 attention probabilities; over the whole text it is +1.2% (docs/golden_quality.md).
    # v1's per-vector activations gave +5.1% here; a wrong mask or scale gives far more.
    assert abs(golden / ref["ppl"] - 1) < 0.05, (golden, ref["ppl"])
