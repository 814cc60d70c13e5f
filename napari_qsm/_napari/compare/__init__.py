"""The "Compare" dock widget: results side by side, difference maps and metrics.

A thin layer over :mod:`napari_qsm.core.compare`, one module per part of the dock:

* :mod:`.picker` — choose a reference (any image layer, or *none*: then every result is scored by
  its field-consistency residual against a chosen field layer), a mask, a field, a Labels layer
  and the result layers;
* :mod:`.slices_tab` with :mod:`.panel` (and its painting, :mod:`.paint`; colour lookup,
  :mod:`.colour`) — an orthogonal-slices panel: per result its axial / coronal / sagittal planes
  through the viewer's current position and the difference to the reference (underneath in a
  narrow dock, beside χ in a wide window, zoomed to the mask); one
  shared χ contrast and one shared difference contrast (ppm). It follows ``viewer.dims`` (and
  optionally the mouse); clicking or scrolling in it moves the viewer;
* :mod:`.grid` — *Side by side* puts the results and their difference maps in napari's grid
  (``viewer.canvas.grid``) with linked contrast; *Restore view* undoes exactly that;
* :mod:`.metrics_tab` — a sortable metric table (best value per column highlighted), *Copy* /
  *Export CSV…* and a bar chart of one metric; :mod:`.regions_tab` — region statistics from a
  Labels layer;
* :mod:`.geometry` — layer arrays ↔ the scan's voxel frame; :mod:`.qt` — shared Qt pieces;
* :mod:`.dock` — :class:`CompareWidget`, which assembles them, follows the viewer, runs the
  metrics in a worker and disconnects on close.
"""

from .dock import CompareWidget

__all__ = ["CompareWidget"]
