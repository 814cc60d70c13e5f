"""The chosen layers' volumes for the Compare dock: lookup by name, in the scan's voxel frame
(cached until the layer's data changes), the mask as booleans, and the data-change hooks."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .geometry import canonical
from .picker import NONE


class ChosenVolumes:
    """Layers of one viewer by name, their voxel-frame arrays, and ``on_data`` when one changes."""

    def __init__(self, viewer, warn: Callable[[str], None], on_data: Callable) -> None:
        self.viewer = viewer
        self._warn = warn
        self._on_data = on_data
        self._cache: dict = {}
        self._connected: list = []

    def layer(self, name: Optional[str]):
        """The layer called ``name`` (None for None, "(none)" or a name no longer in the viewer)."""
        if not name or name == NONE:
            return None
        try:
            return self.viewer.layers[name]
        except (KeyError, ValueError):
            return None

    def canon(self, name: str) -> np.ndarray:
        """The layer's data in the voxel frame (cached by layer and data object)."""
        lay = self.layer(name)
        key = (name, id(lay), id(lay.data))
        got = self._cache.get(name)
        if got is not None and got[0] == key:
            return got[1]
        arr = canonical(lay)
        self._cache[name] = (key, arr)
        return arr

    def clear(self) -> None:
        self._cache.clear()

    def mask(self, name: Optional[str], shape) -> Optional[np.ndarray]:
        """Mask layer ``name`` as booleans (> 0.5), or None (none chosen, or another shape: warned)."""
        if name is None:
            return None
        m = self.canon(name)
        if m.shape != tuple(shape):
            self._warn(f"mask {name!r}: shape {m.shape} does not match {tuple(shape)}; ignored")
            return None
        return m > 0.5 if m.dtype != bool else m

    def watch(self, names) -> None:
        """Call ``on_data`` when the data of any of these layers changes (and stop watching others)."""
        self.unwatch()
        for name in names:
            lay = self.layer(name)
            if lay is not None and lay not in self._connected:
                lay.events.data.connect(self._on_data)
                self._connected.append(lay)

    def unwatch(self) -> None:
        for lay in self._connected:
            try:
                lay.events.data.disconnect(self._on_data)
            except Exception:
                pass
        self._connected = []
