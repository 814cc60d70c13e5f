"""Dipole inversions, one module per family: local field (ppm) and mask in, χ (ppm) out.

Each module declares ``METHODS`` (:class:`napari_qsm.core.method.Method` records) and is listed in
:mod:`napari_qsm.methods`, the registry that the command line, the batch and the docks read.
"""
