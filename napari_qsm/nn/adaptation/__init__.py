"""On-scan adaptation in parts: parameter and result records, scan patches, models, the training run, saving.

The public API is :mod:`napari_qsm.nn.adapt`; the method is described in docs/adaptation.md.
"""
