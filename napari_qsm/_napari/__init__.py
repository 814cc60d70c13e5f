"""Everything that touches napari or Qt: reader, writer, sample data and dock widgets.

Modules: ``reader`` / ``writer`` (NIfTI), ``sample_data`` (phantoms), ``layers`` (layers <-> core
Scan/Result, the display permutation), ``form`` (parameter forms generated from the core's
parameter records), ``workers`` (generator workers with progress and cancel), ``widgets`` (the
"QSM reconstruction" dock). The manifest is ``napari.yaml`` at the top of the repository.
"""
