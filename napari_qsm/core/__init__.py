"""Headless QSM numerics (numpy, scipy, torch, nibabel). Never imports Qt or napari."""
