"""The registry sits above the core: core/ and nn/ declare methods and steps, napari_qsm.methods collects them."""

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import napari_qsm
from napari_qsm import methods as registry
from napari_qsm.core.method import Method

PKG = Path(napari_qsm.__file__).resolve().parent
FORBIDDEN = ("napari_qsm.nn", "napari_qsm._napari", "napari_qsm.cli", "napari_qsm.methods", "napari_qsm.batch",
             "napari_qsm.pipeline",
             "napari_qsm.demo", "napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt")

#: what `napari-qsm methods`, `--method` and the Reconstruction dock listed before the registry moved
METHODS_BEFORE = ["tkd", "tsvd", "tv", "rts", "hdqsm", "ndi", "medi", "cosmos", "dsbn", "dsbn_adapt"]
#: methods added since (issue 25: TFI, iLSQR)
METHODS_ADDED = ["tfi", "ilsqr"]
#: the order everything is listed in (Method.order): iLSQR sits with the other classic inversions, TFI last
METHODS_LISTED = ["tkd", "tsvd", "tv", "rts", "hdqsm", "ndi", "ilsqr", "medi", "cosmos", "dsbn", "dsbn_adapt", "tfi"]


_MODULE_NAME = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+")


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """Absolute module names a file imports, including import_module("...") / __import__("...") strings."""
    tree = ast.parse(path.read_text(), str(path))
    rel_base = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel_base.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            out.append((node.lineno, node.value))  # a module named for a later import_module(name)
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                out.append((node.lineno, str(node.args[0].value)))
    return out


def _violations(folder: Path) -> list[str]:
    bad = []
    for f in sorted(folder.rglob("*.py")):
        for line, mod in _imported_names(f):
            if any(mod == p or mod.startswith(p + ".") for p in FORBIDDEN):
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {mod}")
    return bad


def test_core_imports_nothing_above_it():
    assert _violations(PKG / "core") == []


def test_the_import_scan_can_fail(tmp_path):
    """The scanner sees plain, relative and import_module imports of the upper floors."""
    core = tmp_path / "napari_qsm" / "core"
    core.mkdir(parents=True)
    (core / "bad.py").write_text(textwrap.dedent("""
        import importlib
        from ..nn import infer
        from .. import methods
        importlib.import_module("napari_qsm._napari.widgets")
        MODULES = ["napari_qsm.nn.adapt"]
        DOC = "napari_qsm.nn.adapt is described in a sentence, not named for import"
        from .tkd import truncated_inversion
    """))
    global PKG
    old, PKG = PKG, tmp_path / "napari_qsm"
    try:
        bad = _violations(core)
    finally:
        PKG = old
    assert len([b for b in bad if "napari_qsm.nn" in b]) >= 1
    assert any("napari_qsm.methods" in b for b in bad)
    assert any("napari_qsm._napari.widgets" in b for b in bad)
    assert any("napari_qsm.nn.adapt" in b for b in bad)
    assert not any("tkd" in b or "sentence" in b for b in bad)


def test_methods_listed_as_before_everywhere():
    names = [m.name for m in registry.available_methods()]
    assert sorted(METHODS_LISTED) == sorted(METHODS_BEFORE + METHODS_ADDED)
    assert [n for n in METHODS_LISTED if n in METHODS_BEFORE] == METHODS_BEFORE   # the old ones keep their order
    assert names == METHODS_LISTED, registry.import_errors()
    out = subprocess.run([sys.executable, "-m", "napari_qsm.cli", "methods"], capture_output=True, text=True,
                         check=True).stdout
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")
              and not line.startswith("Steps") and ":" not in line.split()[0]]
    assert listed == METHODS_LISTED
    for name in METHODS_LISTED:
        assert registry.get_method(name).name == name


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_METHODS", {})
    monkeypatch.setattr(registry, "_STEPS", {})
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {})
    yield registry


def test_third_party_method_from_an_entry_point(tmp_path, monkeypatch, fresh_registry):
    """A package installed beside napari-qsm adds an inversion without editing this repository."""
    (tmp_path / "tiny_qsm.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        import numpy as np
        from napari_qsm.core.method import Method
        from napari_qsm.core.params import param

        @dataclass
        class HalfParams:
            factor: float = param(0.5, "χ = factor · field", min=0.0, max=2.0)

        def run(scan, p, *, device, progress=None, cancel=None, **_):
            return np.float32(p.factor) * scan.field * scan.mask

        METHODS = (Method("half", "Half the field", HalfParams, run, order=500, doc="A test inversion."),)
    """))
    dist = tmp_path / "tiny_qsm-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-qsm\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[napari_qsm.methods]\nhalf = tiny_qsm:METHODS\nbroken = tiny_qsm:NOPE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import numpy as np

    from napari_qsm.core.scan import Scan

    names = [m.name for m in fresh_registry.available_methods()]
    assert names == METHODS_LISTED + ["half"]
    assert any("broken" in k for k in fresh_registry.import_errors())
    field = np.ones((4, 4, 4), np.float32)
    res = fresh_registry.reconstruct(Scan(field=field, mask=np.ones((4, 4, 4), bool), voxel_size=(1, 1, 1)),
                                     "half", {"factor": "0.25", "reference": "none"}, device="cpu")
    assert res.method == "half" and np.allclose(res.chi, 0.25)


def test_register_method_at_run_time(fresh_registry):
    m = Method("echo_test", "Echo", object, lambda *a, **k: None, order=999)
    fresh_registry.register_method(m)
    assert fresh_registry.get_method("echo_test") is m
    assert [x.name for x in fresh_registry.available_methods()][:len(METHODS_LISTED)] == METHODS_LISTED
    with pytest.raises(TypeError):
        fresh_registry.register_method("tkd")


def _third_party_step(tmp_path, monkeypatch):
    # (a step, where test_third_party_method_from_an_entry_point above declares a method)
    """An installed package (a dist-info on sys.path) declaring a background step 'demean' by entry point."""
    (tmp_path / "tiny_bg.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        import numpy as np
        from napari_qsm.core.field.steps import Step
        from napari_qsm.core.params import param

        @dataclass
        class DemeanParams:
            scale: float = param(1.0, "factor on the demeaned field", min=0.0, max=2.0)

        def run(field, mask, p, **_):
            mask = np.asarray(mask, bool)
            return np.where(mask, (field - field[mask].mean()) * p.scale, 0).astype(np.float32), mask

        STEPS = (Step("background", "demean", "Demean (test)", DemeanParams, run, doc="A test step."),)
    """))
    dist = tmp_path / "tiny_bg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-bg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[napari_qsm.methods]\ndemean = tiny_bg:STEPS\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_third_party_step_runs_through_field_recon_and_the_api(raw_bids_head, tmp_path, monkeypatch, fresh_registry,
                                                                 capsys):
    """The registry's steps (entry points included) are the ones field, recon and batch use (was: shipped only)."""
    import json

    import nibabel as nib
    import numpy as np

    from napari_qsm.cli import main

    _third_party_step(tmp_path, monkeypatch)
    assert "demean" in [s.name for s in fresh_registry.available_steps("background")]
    out = tmp_path / "f"
    assert main(["field", str(raw_bids_head), "-o", str(out), "--background", "demean", "--param", "scale=0.5",
                 "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    prov = json.loads((out / "field.json").read_text())
    assert prov["steps"][-1]["name"] == "demean" and prov["steps"][-1]["parameters"] == {"scale": 0.5}
    local = np.asarray(nib.load(str(out / "local_field.nii.gz")).dataobj)
    total = np.asarray(nib.load(str(out / "total_field.nii.gz")).dataobj)
    m = np.asarray(nib.load(str(out / "mask.nii.gz")).dataobj) > 0.5
    np.testing.assert_allclose(local[m], 0.5 * (total[m] - total[m].mean()), atol=1e-5)
    chi = tmp_path / "chi.nii.gz"
    assert main(["recon", str(raw_bids_head), "--method", "tkd", "--field-param", "background=demean",
                 "--device", "cpu", "-q", "-o", str(chi)]) == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "chi.json").read_text())
    assert side["extras"]["field_steps"][-1]["name"] == "demean"
    # the API and the batch planner resolve it the same way
    from napari_qsm import pipeline
    assert pipeline.make_recipe({"background": "demean"}).step("background").label == "Demean (test)"
    from napari_qsm.batch import run_batch
    s = run_batch(raw_bids_head.parent.parent, method="tkd", field_params={"background": "demean"}, dry_run=True,
                  echo=False)
    assert [r["status"] for r in s.rows] == ["planned"]
