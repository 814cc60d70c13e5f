from dataclasses import dataclass

import pytest

from napari_qsm.methods import available_methods, get_method
from napari_qsm.core.params import ParamError, make_params, param, params_to_dict, parse_cli_params, specs


@dataclass
class P:
    threshold: float = param(0.15, "thr", min=0.01, max=0.66)
    lam: float = param(1000.0, "lambda", min=0.0, cli="lambda", allow=("auto",))
    iters: int = param(10, "iterations", min=1)
    flag: bool = param(False, "a flag")
    mode: str = param("a", "mode", choices=("a", "b"))


def test_make_params_from_strings():
    p = make_params(P, parse_cli_params(["threshold=0.2", "lambda=auto", "iters=5", "flag=yes", "mode=b"]))
    assert (p.threshold, p.lam, p.iters, p.flag, p.mode) == (0.2, "auto", 5, True, "b")
    assert params_to_dict(p)["lambda"] == "auto"
    assert [s.name for s in specs(P)] == ["threshold", "lambda", "iters", "flag", "mode"]


@pytest.mark.parametrize("item,match", [
    ("threshold=2", "above the maximum"), ("threshold=abc", "expected a number"), ("iters=1.5", "integer"),
    ("flag=maybe", "true/false"), ("mode=c", "not one of"), ("bogus=1", "unknown parameter 'bogus'"),
    ("lambda=-1", "below the minimum"),
])
def test_bad_params(item, match):
    with pytest.raises(ParamError, match=match):
        make_params(P, parse_cli_params([item]))


def test_cli_param_syntax():
    with pytest.raises(ParamError, match="NAME=VALUE"):
        parse_cli_params(["threshold"])


def test_registry():
    names = [m.name for m in available_methods()]
    assert names[:2] == ["tkd", "tsvd"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("method, params, expected", [
    ("tkd", {}, "TKD δ=0.15"),
    ("tkd", {"threshold": 0.2, "correction": True}, "TKD δ=0.2 correction=on"),
    ("medi", {}, "MEDI λ=1000"),
    ("medi", {"lambda": "auto", "percentage": 0.8}, "MEDI λ=auto percentage=0.8"),
    ("dsbn", {}, "QSMInvNet+"),
    ("dsbn_adapt", {}, "QSMInvNet+ adapted (120 steps)"),
    ("dsbn_adapt", {"steps": 40, "mode": "finetune"}, "QSMInvNet+ adapted (40 steps) mode=finetune"),
    ("dsbn_adapt", {"preview_every": 2, "lr": 0.01}, "QSMInvNet+ adapted (120 steps) lr=0.01"),
])
def test_result_names_a_person_would_write(method, params, expected):
    """Only the parameters that differ from the defaults, with their symbols (issue 17); the record stays whole."""
    from napari_qsm.core.params import display_name, make_params

    m = get_method(method)
    p = make_params(m.params_cls, params)
    if method == "dsbn_adapt" and m.params_cls().steps != 120:
        expected = expected.replace("(120 steps)", f"({m.params_cls().steps} steps)")
    assert display_name(m.short or m.label, p) == expected


def test_result_name_and_full_record(rng):
    import numpy as np

    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    scan = Scan(field=rng.standard_normal((8, 8, 8)).astype(np.float32) * 0.01, mask=np.ones((8, 8, 8), bool),
                voxel_size=(1, 1, 1))
    res = reconstruct(scan, "tkd", {"threshold": 0.3}, device="cpu")
    assert res.name == "TKD δ=0.3"
    assert res.provenance()["parameters"] == {"threshold": 0.3, "correction": False, "pad_factor": 2.0, "reference": "mean"}


@dataclass
class _TriState:
    mode: str = param("auto", "a tri-state choice", choices=("auto", "on", "off"))
    legacy: str = param("auto", "a former bool parameter", choices=("auto", "on", "off"),
                        aliases={"true": "on", "false": "off", True: "on", False: "off"})


def test_aliases_belong_to_the_one_parameter_that_declares_them():
    p = make_params(_TriState, {"legacy": "TRUE"})
    assert p.legacy == "on"
    assert make_params(_TriState, {"legacy": False}).legacy == "off"
    assert make_params(_TriState, {"mode": "on"}).mode == "on"
    with pytest.raises(ParamError, match="mode"):       # no alias declared: true is not a choice
        make_params(_TriState, {"mode": "true"})


def test_medi_weak_harmonic_keeps_accepting_true_false_and_hdqsm_refuses_beta_zero():
    medi = get_method("medi")
    assert make_params(medi.params_cls, {"weak_harmonic": "yes"}).weak_harmonic == "on"
    assert make_params(medi.params_cls, {"weak_harmonic": True}).weak_harmonic == "on"
    with pytest.raises(ParamError, match="beta"):
        make_params(get_method("hdqsm").params_cls, {"beta": 0})
