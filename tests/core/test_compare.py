"""Headless comparison: metric table, difference maps, slices and region statistics."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_qsm.core import compare as cmp
from napari_qsm.core.sim.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((32, 36, 30), (5.0, 5.0, 5.0), seed=3)


@pytest.fixture(scope="module")
def results(phantom):
    rng = np.random.default_rng(0)
    truth = phantom.chi
    m = phantom.mask
    return {
        "half": (0.5 * truth).astype(np.float32),
        "noisy": (truth + 0.02 * rng.standard_normal(truth.shape) * m).astype(np.float32),
        "offset": (truth + 0.01 * m).astype(np.float32),
    }


def test_metrics_per_result_equal_compute_metrics(phantom, results):
    metrics = pytest.importorskip("napari_qsm.core.metrics")
    table = cmp.compare(results, phantom.chi, phantom.mask, reference_name="truth")
    assert table.names == list(results)
    assert table.reference == "truth"
    assert "field_residual" not in table.columns
    for name, x in results.items():
        want = metrics.compute_metrics(x, ref=phantom.chi, mask=phantom.mask)
        row = table.row(name)
        for k in cmp.REFERENCE_METRICS:
            assert k in table.columns
            np.testing.assert_allclose(row[k], want[k], rtol=1e-6, equal_nan=True)
    # the noisy result is closer to the truth than half of it
    assert table.row("noisy")["correlation"] > 0.5
    best = cmp.best_per_column(table)
    for k in ("nrmse", "psnr"):
        assert best[k] == min(results, key=lambda n: table.row(n)["nrmse"])
    # demeaning makes the offset result perfect
    assert table.row("offset")["nrmse_demeaned"] == pytest.approx(0.0, abs=1e-3)
    assert best["nrmse_demeaned"] == "offset"


def test_field_residual_without_reference(phantom, results):
    metrics = pytest.importorskip("napari_qsm.core.metrics")
    sub = {"truth": phantom.chi, "half": results["half"]}
    table = cmp.compare(sub, None, phantom.mask, field=phantom.field, voxel_size=phantom.voxel_size,
                        b0_direction=phantom.b0_direction)
    assert table.columns == ["field_residual"]
    assert table.reference is None
    for name, x in sub.items():
        want = metrics.field_residual(x, phantom.field, phantom.mask, phantom.voxel_size, phantom.b0_direction)
        want = want["field_residual"] if isinstance(want, dict) else want
        np.testing.assert_allclose(table.row(name)["field_residual"], want, rtol=1e-5)
    assert table.row("truth")["field_residual"] < table.row("half")["field_residual"]
    assert cmp.best_per_column(table)["field_residual"] == "truth"
    with pytest.raises(ValueError, match="field"):
        cmp.compare(sub, None, phantom.mask)


def test_compare_rejects_mismatched_shapes(phantom):
    pytest.importorskip("napari_qsm.core.metrics")
    with pytest.raises(ValueError, match="'bad'"):
        cmp.compare({"bad": np.zeros((4, 4, 4), np.float32)}, phantom.chi, phantom.mask)


def test_compare_cancel(phantom, results):
    pytest.importorskip("napari_qsm.core.metrics")
    from napari_qsm.core.progress import CancelToken, Cancelled

    tok = CancelToken()
    seen = []

    def prog(p):
        seen.append(p.step)
        tok.cancel()

    with pytest.raises(Cancelled):
        cmp.compare(results, phantom.chi, phantom.mask, progress=prog, cancel=tok)
    assert seen == [1]


def test_csv_and_text_export(tmp_path):
    table = cmp.CompareTable(
        rows=[cmp.CompareRow("tkd", {"psnr": 30.5, "nrmse": 40.25}),
              cmp.CompareRow("medi", {"psnr": 33.0, "nrmse": float("nan")})],
        columns=["psnr", "nrmse"], reference="truth")
    p = cmp.to_csv(table, tmp_path / "m.csv")
    rows = list(csv.reader(p.open()))
    assert rows == [["result", "psnr", "nrmse"], ["tkd", "30.5", "40.25"], ["medi", "33", "nan"]]
    text = cmp.to_text(table)
    lines = text.splitlines()
    assert lines[0].split("\t")[0] == "result" and "PSNR" in lines[0] and "(dB)" in lines[0]
    assert lines[1].split("\t") == ["tkd", "30.5", "40.25"]
    best = cmp.best_per_column(table)
    assert best == {"psnr": "medi", "nrmse": "tkd"}
    with pytest.raises(ValueError, match="does not exist"):
        cmp.to_csv(table, tmp_path / "nope" / "m.csv")


def test_difference_maps(phantom, results):
    d = cmp.difference_maps(results, phantom.chi, phantom.mask, demean=False)
    assert set(d) == set(results)
    m = phantom.mask
    np.testing.assert_allclose(d["half"][m], (results["half"] - phantom.chi)[m], atol=1e-7)
    assert np.all(d["half"][~m] == 0)
    assert d["half"].dtype == np.float32
    dm = cmp.difference_maps(results, phantom.chi, phantom.mask, demean=True)
    np.testing.assert_allclose(dm["offset"][m], 0.0, atol=1e-6)  # constant offset removed
    assert abs(dm["noisy"][m].mean()) < 1e-6
    # inputs untouched
    np.testing.assert_array_equal(results["offset"], (phantom.chi + 0.01 * m).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        cmp.difference(np.zeros((3, 3, 3)), phantom.chi)


def test_field_residual_map(phantom):
    r = cmp.field_residual_map(phantom.chi, phantom.field, phantom.mask, phantom.voxel_size,
                               phantom.b0_direction, device="cpu")
    assert r.shape == phantom.chi.shape
    assert np.abs(r).max() < 1e-3  # noise-free phantom: the truth explains the field
    r0 = cmp.field_residual_map(np.zeros_like(phantom.chi), phantom.field, phantom.mask,
                                phantom.voxel_size, phantom.b0_direction, device="cpu")
    assert np.abs(r0).max() > 10 * np.abs(r).max()
    assert np.all(r0[~phantom.mask] == 0)


def test_orthogonal_slices_indexing_and_extent():
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    ax, co, sa = cmp.orthogonal_slices(vol, (1, 2, 3), (1.0, 2.0, 3.0))
    assert (ax.name, co.name, sa.name) == ("axial", "coronal", "sagittal")
    np.testing.assert_array_equal(ax.data, vol[:, :, 3].T)   # rows = j (P→A), cols = i (L→R)
    np.testing.assert_array_equal(co.data, vol[:, 2, :].T)   # rows = k (I→S), cols = i
    np.testing.assert_array_equal(sa.data, vol[1, :, :].T)   # rows = k, cols = j
    assert np.shares_memory(ax.data, vol)                    # pure indexing, no copy
    assert ax.extent == (-0.5, 3.5, -1.0, 9.0)
    assert co.extent == (-0.5, 3.5, -1.5, 16.5)
    assert sa.extent == (-1.0, 9.0, -1.5, 16.5)
    assert ax.cross == (1.0, 4.0) and co.cross == (1.0, 9.0) and sa.cross == (4.0, 9.0)
    assert ax.width_mm == 4.0 and ax.height_mm == 10.0
    # out-of-range and fractional points are clamped / rounded
    ax2, _, sa2 = cmp.orthogonal_slices(vol, (10, -3, 2.6), (1, 1, 1))
    assert ax2.index == 3 and sa2.index == 3
    # a click in the coronal plane moves i and k, keeps j
    p = cmp.plane_click_to_point(co, 2.2, 14.0, (1, 2, 3), vol.shape, (1.0, 2.0, 3.0))
    assert p == (2, 2, 5)


def test_region_stats_known_labels(phantom):
    truth = phantom.chi
    res = {"half": 0.5 * truth, "truth": truth.copy(), "shifted": truth + 0.1}
    st = cmp.region_stats(res, truth, phantom.labels, phantom.label_names, mask=phantom.mask)
    assert 0 not in st.labels
    assert all(1 <= v <= 12 for v in st.labels)  # extra-cerebral labels lie outside the mask
    assert "globus_pallidus" in st.names and "thalamus" in st.names
    k = st.names.index("globus_pallidus")
    sel = (phantom.labels == st.labels[k]) & phantom.mask
    assert st.counts[k] == sel.sum()
    np.testing.assert_allclose(st.reference[k], truth[sel].mean(), rtol=1e-6)
    np.testing.assert_allclose(st.means["half"], 0.5 * st.reference, rtol=1e-6, atol=1e-9)
    f = st.fits["half"]
    assert f.slope == pytest.approx(0.5, abs=1e-6)
    assert f.intercept == pytest.approx(0.0, abs=1e-7)
    assert f.r2 == pytest.approx(1.0, abs=1e-9)
    assert st.fits["truth"].slope == pytest.approx(1.0) and st.fits["truth"].r2 == pytest.approx(1.0)
    assert st.fits["shifted"].intercept == pytest.approx(0.1, abs=1e-6)
    text = st.to_text()
    assert "globus_pallidus" in text and "slope" in text
    # no reference: means only
    st2 = cmp.region_stats(res, None, phantom.labels, phantom.label_names, include=[6, 7])
    assert st2.labels == [6, 7] and st2.fits == {} and st2.reference is None


def test_linear_fit_degenerate():
    assert np.isnan(cmp.linear_fit([1.0], [2.0]).slope)
    assert np.isnan(cmp.linear_fit([1.0, 1.0], [2.0, 3.0]).slope)
    f = cmp.linear_fit([0, 1, 2, 3], [1, 3, 5, 7.5])
    assert 0.99 < f.r2 < 1.0 and f.n == 4


def test_compare_steps_match_the_one_shot_functions(phantom, results):
    """The widget's step generator yields what compare / region_stats / field_residual_map give."""
    steps = list(cmp.compare_steps(results, phantom.chi, phantom.mask, reference_name="truth",
                                   labels=phantom.labels))
    kinds = [s[0] for s in steps]
    assert kinds == ["noop"] * 3 + ["offsets"] + ["row"] * 3 + ["table", "regions"]
    offs = dict(steps[3][1])
    for n, x in results.items():
        assert offs[n] == pytest.approx(float(np.mean(x[phantom.mask] - phantom.chi[phantom.mask])), abs=1e-7)
    table = steps[-2][1]
    want = cmp.compare(results, phantom.chi, phantom.mask, reference_name="truth")
    assert table.names == want.names and table.columns == want.columns and table.reference == "truth"
    assert steps[-1][1].fits["half"].slope == pytest.approx(0.5, abs=1e-5)
    # without a reference: residual maps, then the residual-only table
    sub = {"half": results["half"]}
    steps = list(cmp.compare_steps(sub, None, phantom.mask, field=phantom.field, voxel_size=phantom.voxel_size,
                                   b0_direction=phantom.b0_direction, residual_maps=True))
    assert [s[0] for s in steps] == ["residual", "row", "table"]
    np.testing.assert_allclose(steps[0][2], cmp.field_residual_map(sub["half"], phantom.field, phantom.mask,
                                                                   phantom.voxel_size, phantom.b0_direction),
                               atol=1e-6)
    assert steps[-1][1].columns == ["field_residual"]


def test_display_helpers():
    assert cmp.format_metric("ssim", 0.93456) == "0.9346"
    assert cmp.format_metric("psnr", 123.45) == "123.5" and cmp.format_metric("nrmse", 41.7407) == "41.74"
    assert cmp.format_metric("nrmse", float("nan")) == "—"
    assert cmp.nice(0.1234) == 0.12 and cmp.nice(-0.0456) == -0.046 and cmp.nice(0.0) == 0.0
    vol = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    lo, hi, dl = cmp.auto_window(vol)
    assert lo == pytest.approx(-0.98) and hi == pytest.approx(0.98) and dl == pytest.approx(0.65)
    assert cmp.auto_window(np.full((4, 4, 4), np.nan, np.float32)) is None
    line = cmp.describe_provenance({"method": "tkd", "seconds": 1.25, "parameters": {"threshold": 0.15, "x": True}})
    assert line == "TKD · 1.2 s"  # the parameters are in the result's name, not repeated raw
    assert cmp.describe_provenance({"method": "dsbn", "seconds": 150, "device": "cuda:0",
                                    "parameters": {"memory_gb": 3.0}}) == "DSBN · 2.5 min · cuda:0"
    assert cmp.describe_provenance(None) == ""
    # the difference a grid layer shows: demeaned in the mask (or by a given offset), 0 outside
    x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    m = np.zeros(x.shape, bool)
    m[0] = True
    d = cmp.shown_difference(x, np.zeros_like(x), m)
    assert d[m].mean() == pytest.approx(0.0) and np.all(d[~m] == 0)
    assert cmp.shown_difference(x, x - 1, None, offset=0.5)[1, 1, 1] == pytest.approx(0.5)
    assert cmp.shown_difference(x, x - 1, None, demean=False)[0, 0, 0] == pytest.approx(1.0)
