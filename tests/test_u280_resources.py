"""docs/u280_resources.json (bench/u280_resources.py) against the floorplan and the user region.

No Yosys run: the committed figures must add up, be split over the SLRs as ``hw.vitis.slr_plan``
pins the cells today, fit in every resource, and state the verdict the figures give.
"""

import json
import pathlib
import sys

import pytest

from flightllm.hw.params import get_preset
from flightllm.hw.vitis import slr_plan

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "u280_resources.json"
COLS = ("DSP48E2", "LUT", "FF", "BRAM36", "URAM288")


@pytest.fixture(scope="module")
def summary():
    if not DOC.exists():
        pytest.skip("docs/u280_resources.json not generated")
    return json.loads(DOC.read_text())["summary"]


def _sum(ds):
    ds = list(ds)
    return {c: sum(d[c] for d in ds) for c in COLS}


def _close(a, b):
    return all(abs(a[c] - b[c]) < 1e-6 for c in COLS)


def test_slr_sums_equal_total(summary):
    assert _close(_sum(summary["items"].values()), summary["total"])
    for slr, groups in summary["slr"].items():
        assert _close(_sum(groups.values()), summary["slr_total"][slr]), slr
    assert _close(_sum(summary["slr_total"].values()), summary["total"])


def test_split_is_slr_plan(summary):
    plan = slr_plan(get_preset("u280"))
    assert summary["slr_plan_cells"] == {s: [c for c, _ in cells] for s, cells in plan.items()}
    items = summary["items"]
    pinned = set()
    for slr, cells in plan.items():
        names = [c for c, _ in cells]
        assert all(c in items for c in names), slr
        assert _close(_sum(items[c] for c in names), summary["slr_total"][slr]), slr
        pinned |= set(names)
    rest = [v for c, v in items.items() if c not in pinned]
    assert _close(_sum(rest), summary["slr_total"]["unpinned"])


def _region():
    sys.path.insert(0, str(ROOT / "bench"))
    from resources import U280_REGION
    return U280_REGION


@pytest.mark.parametrize("k", ["DSP48E2", "LUT", "BRAM36", "URAM288"])
def test_fits_user_region(summary, k):
    cap = _region()[k]
    assert summary["total"][k] <= cap
    for slr, tot in summary["slr_total"].items():
        if slr in summary["capacity"]:
            assert tot[k] <= summary["capacity"][slr][k], slr
    pinned = sum(v[k] for s, v in summary["slr_total"].items() if s != "unpinned")
    assert summary["free_after_pinned"][k] == cap - pinned
    assert summary["slr_total"]["unpinned"][k] <= summary["free_after_pinned"][k]


def test_verdict_matches_the_figures(summary):
    """The fit the doc states is the figures', resource by resource."""
    for k in ("DSP48E2", "LUT", "BRAM36", "URAM288"):
        assert summary["fits"]["region"][k] == (summary["total"][k] <= _region()[k]), k
        assert summary["fits"]["unpinned_in_free"][k] == (summary["slr_total"]["unpinned"][k]
                                                          <= summary["free_after_pinned"][k]), k


def test_mac_share(summary):
    p = get_preset("u280")
    assert summary["mac_dsps"] == p.chains * p.chain_len
    assert summary["dsp_share_of_kernel"] == pytest.approx(p.chains * p.chain_len / summary["total"]["DSP48E2"], abs=1e-4)
    chains = [v for c, v in summary["items"].items() if c.startswith("unit_mpe/core/engine/chain")]
    assert len(chains) == p.chains and all(v["DSP48E2"] >= p.chain_len for v in chains)
