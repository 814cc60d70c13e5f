"""The adaptation's ETA, from what this run has measured (issue 23: the 1 mm ETA was 200 s short).

The ETA of step s is the time until :func:`napari_qsm.nn.adapt.adapt` returns:

* the remaining steps × the mean measured step (each step's synthetic batch, patch sampling, SMV
  filtering, L_T, prior, backward and optimiser step; the first step is left out of the mean once
  there are others, it carries one-off start-up costs);
* the remaining χ previews × the measured whole-volume inference of the first scan;
* the final inference: one pass per scan, two for one scan whose mean is kept (the mean correction
  is baked into the output bias and χ is inferred again), each timed when the reference mean or a
  preview inferred that scan; else the seconds per voxel of an inference of a patch-sized crop of
  the scan, timed before the first step (:func:`napari_qsm.nn.adaptation.loop.reference_mean`),
  times the scan's padded volume;
* the data consistency of each preview and of each scan's final χ (``AdaptParams.consistency`` CG
  steps): timed when a preview ran it, else one CG iteration timed before the first step scaled to
  the whole step (``3 + 2·iterations`` FFT pairs of the mask's box).
"""

from __future__ import annotations

import math


class AdaptClock:
    """Measured seconds of one adaptation run and the ETA they give.

    Parameters
    ----------
    steps : int
        The run's last step (``AdaptParams.steps``).
    preview_every : int
        ``AdaptParams.preview_every`` (0 = no previews).
    volumes : sequence of int
        Voxels each scan's whole-volume inference runs on (its shape rounded up to the network's multiple).
    """

    def __init__(self, steps: int, preview_every: int, volumes):
        self.steps, self.preview_every = int(steps), int(preview_every)
        self.volumes = [int(v) for v in volumes]
        self.step_seconds: list[float] = []
        self.predict_seconds: dict[int, float] = {}
        self.predict_rate: dict[int, float] = {}     # seconds per voxel of a crop's inference (fallback)
        self.consistency_seconds: dict[int, float] = {}
        self.consistency_probe: dict[int, float] = {}  # the whole data consistency rated from one CG iteration

    def add_step(self, seconds: float) -> None:
        self.step_seconds.append(float(seconds))

    def add_predict(self, scan: int, seconds: float) -> None:
        """A whole-volume inference of scan ``scan`` took ``seconds`` (the latest one counts)."""
        self.predict_seconds[int(scan)] = float(seconds)

    def add_rate(self, scan: int, seconds: float, voxels: int) -> None:
        """An inference of ``voxels`` voxels (a crop) of scan ``scan`` took ``seconds``."""
        self.predict_rate[int(scan)] = float(seconds) / max(int(voxels), 1)

    def add_consistency(self, scan: int, seconds: float) -> None:
        """The data consistency of scan ``scan`` took ``seconds`` (the latest one counts)."""
        self.consistency_seconds[int(scan)] = float(seconds)

    def add_consistency_probe(self, scan: int, seconds: float, iterations: int) -> None:
        """One CG iteration of scan ``scan``'s data consistency (3 + 2 FFT pairs) took ``seconds``: the whole
        step of ``iterations`` iterations is rated at ``seconds·(3 + 2·iterations)/5``."""
        self.consistency_probe[int(scan)] = float(seconds) * (3 + 2 * int(iterations)) / 5.0

    def consistency(self, scan: int) -> float:
        """Seconds of the data consistency of scan ``scan``: measured, else rated from one iteration (0 when off)."""
        return self.consistency_seconds.get(scan, self.consistency_probe.get(scan, 0.0))

    def per_step(self) -> float:
        s = self.step_seconds
        if not s:
            return 0.0
        rest = s[1:] if len(s) > 1 else s
        return sum(rest) / len(rest)

    def predict(self, scan: int) -> float:
        """Seconds of one inference of scan ``scan``: measured, else its crop's rate × its volume."""
        if scan in self.predict_seconds:
            return self.predict_seconds[scan]
        return self.predict_rate.get(scan, 0.0) * self.volumes[scan]

    def previews_left(self, step: int) -> int:
        if not self.preview_every:
            return 0
        e = self.preview_every
        n = self.steps // e - step // e
        return n + (1 if self.steps % e and step < self.steps else 0)

    def eta(self, step: int, keep_mean: bool) -> float:
        """Seconds still expected after ``step``: steps, previews and the final inference.

        Parameters
        ----------
        step : int
            The step just completed.
        keep_mean : bool
            The run keeps the unadapted mean (a reference mean exists), so one scan is inferred twice.

        Returns
        -------
        float
        """
        left = max(self.steps - step, 0)
        t = left * self.per_step() + self.previews_left(step) * (self.predict(0) + self.consistency(0))
        passes = 2 if (keep_mean and len(self.volumes) == 1) else 1
        t += sum(passes * self.predict(k) + self.consistency(k) for k in range(len(self.volumes)))
        return t if math.isfinite(t) else 0.0
