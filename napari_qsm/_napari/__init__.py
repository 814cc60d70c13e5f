"""Everything that touches napari or Qt: reader, writer, sample data and dock widgets.

``reader`` / ``writer`` (NIfTI), ``sample_data`` (phantoms), ``layers`` (layers <-> core Scan/Result,
the display permutation), ``layer_roles`` (which layer is what), ``form`` (parameter forms from the
core's records), ``workers`` (generator workers with progress and cancel), ``kit`` (the shared Qt
kit), ``run_dock`` (the dock base: Run / Cancel / progress), ``docks`` (tabbing the docks), and one
module per dock: ``reconstruct_dock`` (+ ``inputs_panel``), ``field_widget`` (+ ``field_sources``,
``field_mask``, ``field_words``), ``adapt_widget``, ``compare/``, ``derivatives`` (Batch results).
The manifest is ``napari_qsm/napari.yaml``.
"""
