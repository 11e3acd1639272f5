"""The ``dp_step`` bench op (fastadv/bench/dp_ghost.py) through the bench
machinery: the smallest CPU case (BERT-tiny, B = 4) checks ok against Opacus
vanilla for every DP implementation and fills the peak-memory columns."""
import pytest
import torch

from fastadv import bench
from fastadv.bench import report, run
from fastadv.bench.case import units_of

pytest.importorskip("opacus")
pytest.importorskip("transformers")

DP_IMPLS = {"opacus-ghost", "fastadv-vanilla", "fastadv-ghost", "fastadv-bk"}


def _units(model, quick=True):
    module = bench.load("dp_step")
    return [u for u in units_of("dp_step", module, torch.device("cpu"), quick=quick) if u.case.model == model]


def test_smallest_cpu_case_checks_ok_and_reports_peak_memory():
    units = _units("bert-base")
    assert {u.case for u in units_of("dp_step", bench.load("dp_step"), torch.device("cpu"), quick=True)} == \
        {units[0].case}  # the CPU main job runs this case only
    assert {u.impl.name for u in units} == {"nonprivate", "reference"} | DP_IMPLS
    rows = run.run_plan(units, "cpu", timed=False, log=lambda s: None)
    for r in rows:
        assert not r.get("error") and not r.get("skipped"), r
        assert r["check"] == "ok", r.get("check_detail")
        assert r["peak_mb"] > 0 and r["launches"] > 0 and r["syncs"] is not None
    for r in rows:
        if r["impl"] != "nonprivate":
            assert r["peak_vs_nonprivate"] > 0
        if r["impl"].startswith("fastadv"):
            assert r["backend"] == "torch"  # auto on CPU


def test_opacus_ghost_refuses_the_tied_gpt2_with_a_reason():
    (unit,) = [u for u in _units("gpt2", quick=False) if u.impl.name == "opacus-ghost"]
    row = run.run_unit(unit.op, unit.case.name, unit.impl, "cpu", warmup=0, iters=1, timed=False)
    assert "tied weights" in row["skipped"] and "check" not in row


def test_throughput_fraction_of_nonprivate_on_timed_rows():
    rows = [{"op": "dp_step", "case": "c", "impl": i, "ms": ms}
            for i, ms in (("nonprivate", 2.0), ("reference", 8.0), ("fastadv-bk", 2.5))]
    report.add_derived(rows, None)
    assert [r["vs_nonprivate"] for r in rows] == [1.0, 0.25, 0.8]
    report.add_derived(rows, None, speedups=False)  # a CPU run: no fraction from CPU times
    assert all(r["vs_nonprivate"] is None for r in rows)
