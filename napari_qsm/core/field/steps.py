"""The record that declares one front-end step (raw echoes → local field).

Each step-family module (``fit.py``, ``unwrap.py``, ``mask.py``, ``background.py``) defines, per
method, a parameter record (a dataclass with :func:`napari_qsm.core.params.param` fields: default,
range and a one-line doc each) and a pure function of its inputs, and lists them in a module-level
``STEPS = (Step(...), ...)``. The registry collects the tuples, so the command line
(``--param NAME=VALUE``), the Python API and the generated dock forms come from one place.

``run`` is called as ``run(inputs..., params, *, progress=None, cancel=None)``; the inputs of each
family are documented in its module. Steps keep no hidden state, so a batch can cache each stage by
a hash of its inputs and parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Step", "FAMILIES", "DERIVED_FAMILIES"]

#: step families in pipeline order
FAMILIES = ("fit", "unwrap", "mask", "background")
#: families of maps made beside the local field from the same echoes (not part of its chain)
DERIVED_FAMILIES = ("swi",)


@dataclass(frozen=True)
class Step:
    family: str                   # one of FAMILIES (or DERIVED_FAMILIES: maps beside the local field)
    name: str                     # key within the family, CLI value (e.g. "vsharp")
    label: str                    # human name ("V-SHARP")
    params_cls: type              # parameter record dataclass
    run: Callable[..., Any]
    doc: str = ""                 # one paragraph: what it does, its convention, its published defaults
    default: bool = False         # the family's default step
    exact: bool = True            # False when the result is known to differ from the truth by construction
    order: int = 100              # position in drop-downs

    def __post_init__(self) -> None:
        if self.family not in FAMILIES + DERIVED_FAMILIES:
            raise ValueError(f"Step {self.name!r}: family must be one of {FAMILIES + DERIVED_FAMILIES}, "
                             f"got {self.family!r}")
