"""napari-qsm: quantitative susceptibility mapping, headless and in napari.

The headless API lives in :mod:`napari_qsm.core` (numpy, scipy, torch, nibabel; never Qt)
and :mod:`napari_qsm.nn` (torch networks). Everything touching napari lives in
:mod:`napari_qsm._napari`.
"""

__version__ = "0.1.0"
