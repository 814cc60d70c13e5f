"""Spatial phase unwrapping (step family "unwrap").

Inputs of every method: ``run(phase, params=None, *, magnitude=None, mask=None, voxel_size=(1, 1, 1),
te=None, device="auto", progress=None, cancel=None) -> np.ndarray`` (float32, radians, same shape).

* ``phase``: wrapped phase in radians, 3-D (i, j, k) or 4-D multi-echo (i, j, k, echo). Echo phase
  offsets should already be removed (MCPC-3D-S, ``fit.py``) when echoes are combined by TE.
  A wrapped *field* (e.g. the MEDI nonlinear fit's ω·ΔTE) is unwrapped the same way: convert it to
  radians over ΔTE first.
* ``magnitude``: optional, same shape as ``phase`` (or 3-D for a 4-D phase); enters the edge quality.
* ``mask``: optional boolean volume; outside it the output is 0. Default: everything.
* ``te``: echo times (s), required for 4-D phase (the 2π correction between echoes scales by TE).

Methods
-------
``quality`` (default, exact): quality-guided path following as in ROMEO (Dymerska et al. 2021).
Each pair of face neighbours inside the mask is an edge with a quality in [0, 1] from the phase
(1 − |wrapped difference|/π), the magnitude (coherence (min/max)² and a brightness weight) and,
for multi-echo data, the agreement of the echo-2 phase gradient with the TE-scaled echo-1 gradient.
Region growing that always takes the best remaining edge next is Prim's algorithm for the
*maximum spanning tree* of that graph; we build the tree with
:func:`scipy.sparse.csgraph.minimum_spanning_tree` on cost 2 − quality and integrate the wrapped
differences along it (pointer doubling, no Python loop per voxel). Every mask component is grown
from its best voxel. The result is exact — it differs from the true phase only by one constant
multiple of 2π per connected component — wherever the true phase step along the tree is below π.
The tree never leaves a jump above π along its own edges, so a voxel that it reached through
one bad edge (at the mask's edge next to an air cavity) can hold a 2π error that shows only against
its other neighbours: :func:`fix_residual_wraps` (``fix_jumps``, on by default) shifts by 2π every
voxel that differs by more than π from most of its in-mask 26-neighbours, until none does;
:func:`residual_jumps` counts the neighbour pairs still above π. A global 2π correction then moves
the median inside the mask into (−π, π] (ROMEO's ``correctglobal``). Multi-echo: the template echo is unwrapped spatially and every other echo
is unwrapped against it voxel by voxel, φ_n = w_n + 2π·round((φ_t·TE_n/TE_t − w_n)/2π)
(``echo_mode="template"``), or each echo is unwrapped spatially and shifted by the 2π multiple that
best matches the scaled template (``"individual"``).

``laplacian`` (fast, NOT exact): Schofield & Zhu (2003) φ = ∇⁻²[∇²φ], with ∇²φ taken from the
wrapped data. Default ``form="differences"``: the 7-point Laplacian built from wrapped neighbour
differences (physical voxel sizes), exactly the discrete Laplacian of the true phase where the
steps are below π; ``"sincos"``: the paper's cos φ·∇²sin φ − sin φ·∇²cos φ, which underestimates
steep gradients (sin Δ < Δ). ∇⁻² by FFTs in torch on ``device``, zero padded as
:mod:`napari_qsm.core.dipole` pads. The data's boundary (the edge of the padded field of view)
is not the true phase's, so the result differs from the true phase by a *harmonic* function. Fine before SHARP-type background removal,
which removes harmonic fields; wrong for echo fits that need the phase itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

from ..device import resolve_device
from ..dipole import check_voxel_size, fast_shape, kspace_grid, pad_volume, crop_volume
from ..params import param
from ..progress import Reporter, check_cancel
from ..scan import ScanError
from .steps import Step

__all__ = ["QualityUnwrapParams", "LaplacianUnwrapParams", "unwrap_quality", "unwrap_laplacian",
           "edge_quality", "voxel_quality", "wrap", "residual_jumps", "fix_residual_wraps", "STEPS"]

TWO_PI = 2.0 * np.pi


def wrap(x):
    """Wrap radians into [−π, π)."""
    return (np.asarray(x) + np.pi) % TWO_PI - np.pi


# --------------------------------------------------------------------------------------- inputs
def check_phase_inputs(phase, magnitude=None, mask=None, te=None):
    """Validate and convert the family's inputs; returns (phase 4-D, magnitude 4-D|None, mask, te|None, was3d)."""
    p = np.asarray(phase)
    if np.iscomplexobj(p):
        raise ScanError("phase: complex data given; expected the wrapped phase in radians (use np.angle)")
    if p.ndim not in (3, 4) or p.size == 0 or min(p.shape) < 1:
        raise ScanError(f"phase: expected a 3-D volume or 4-D echoes (i, j, k, echo), got shape {p.shape}")
    was3d = p.ndim == 3
    p = p.astype(np.float32, copy=False)
    if was3d:
        p = p[..., None]
    if not np.all(np.isfinite(p)):
        raise ScanError("phase: contains NaN or Inf; expected finite radians")
    shape = p.shape[:3]
    m = None
    if magnitude is not None:
        m = np.asarray(magnitude, dtype=np.float32)
        if m.ndim == 3:
            m = m[..., None]
        if m.shape[:3] != shape or m.shape[3] not in (1, p.shape[3]):
            raise ScanError(f"magnitude: shape {np.shape(magnitude)} does not match the phase {np.shape(phase)}")
        if not np.all(np.isfinite(m)):
            raise ScanError("magnitude: contains NaN or Inf")
    if mask is None:
        msk = np.ones(shape, bool)
    else:
        msk = np.asarray(mask)
        if msk.shape != shape:
            raise ScanError(f"mask: shape {msk.shape} does not match the phase volume {shape}")
        msk = msk.astype(bool)
        if not msk.any():
            raise ScanError("mask: empty (no voxel inside); expected a brain mask")
    t = None
    if p.shape[3] > 1:
        if te is None:
            raise ScanError(f"te: {p.shape[3]} echoes need their echo times (s) for the 2π correction between echoes")
        t = np.asarray(te, dtype=np.float64).reshape(-1)
        if t.size != p.shape[3] or not np.all(np.isfinite(t)) or np.any(t <= 0):
            raise ScanError(f"te: expected {p.shape[3]} positive echo times in seconds, got {te!r}")
    return p, m, msk, t, was3d


# --------------------------------------------------------------------------------------- quality
def _face_pair(ax: int, n: int) -> tuple[tuple, tuple]:
    """Index tuples of the two voxels of every face along axis ``ax`` (length ``n``): lower, upper."""
    a = [slice(None)] * 3
    b = [slice(None)] * 3
    a[ax] = slice(0, n - 1)
    b[ax] = slice(1, n)
    return tuple(a), tuple(b)


def edge_quality(phase, magnitude=None, phase2=None, te_ratio=None):
    """Quality in [0, 1] of the edges to the next voxel along each axis: a list of 3 arrays.

    ``phase`` 3-D radians; ``magnitude`` optional 3-D; ``phase2`` optional second-echo phase whose
    gradient should equal ``te_ratio`` × the first one's (multi-echo gradient coherence).
    """
    phase = np.asarray(phase, np.float32)
    mag = None
    if magnitude is not None:
        mag = np.abs(np.asarray(magnitude, np.float32))
        ref = float(np.percentile(mag[mag > 0], 90)) if np.any(mag > 0) else 1.0
        ref = ref if ref > 0 else 1.0
    out = []
    for ax in range(3):
        a, b = _face_pair(ax, phase.shape[ax])
        d = wrap(phase[b] - phase[a])
        q = 1.0 - np.abs(d) / np.float32(np.pi)
        if phase2 is not None:
            d2 = wrap(np.asarray(phase2, np.float32)[b] - np.asarray(phase2, np.float32)[a])
            q *= np.maximum(0.0, 1.0 - np.abs(wrap(d2 - np.float32(te_ratio) * d)) / np.float32(np.pi))
        if mag is not None:
            lo = np.minimum(mag[a], mag[b])
            hi = np.maximum(mag[a], mag[b])
            q *= np.where(hi > 0, (lo / np.maximum(hi, 1e-30)) ** 2, 0.0)
            q *= 0.1 + 0.9 * np.minimum(1.0, 0.5 * (mag[a] + mag[b]) / np.float32(ref))
        out.append(np.clip(q, 0.0, 1.0).astype(np.float32))
    return out


def voxel_quality(phase, magnitude=None, te=None) -> np.ndarray:
    """Per-voxel phase quality in [0, 1]: the mean quality of the voxel's face edges (:func:`edge_quality`).

    ``phase`` 3-D or 4-D (echo 1, with echo 2's gradient coherence when given with ``te``); noise
    (random phase, no signal) scores low, so the map can be thresholded into a mask (QSMxT's default).
    """
    ph, mag, _, t, _ = check_phase_inputs(phase, magnitude, None, te)
    m = None if mag is None else mag[..., 0]
    ph2 = ratio = None
    if ph.shape[3] > 1:
        ph2, ratio = ph[..., 1], t[1] / t[0]
    q = edge_quality(ph[..., 0], m, ph2, ratio)
    acc = np.zeros(ph.shape[:3], np.float32)
    cnt = np.zeros(ph.shape[:3], np.float32)
    for ax in range(3):
        a, b = _face_pair(ax, ph.shape[ax])
        acc[a] += q[ax]
        acc[b] += q[ax]
        cnt[a] += 1
        cnt[b] += 1
    return acc / np.maximum(cnt, 1)


def _tree_unwrap(phase, quality_edges, mask, rep=None):
    """Integrate wrapped differences along the maximum spanning tree of the edge qualities (3-D)."""
    shape = phase.shape
    idx = np.full(shape, -1, np.int64)
    nvox = int(mask.sum())
    idx[mask] = np.arange(nvox)
    rows, cols, cost = [], [], []
    for ax in range(3):
        a, b = _face_pair(ax, shape[ax])
        both = mask[a] & mask[b]
        rows.append(idx[a][both])
        cols.append(idx[b][both])
        cost.append(2.0 - quality_edges[ax][both].astype(np.float64))  # > 0: csgraph drops zero weights
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    cost = np.concatenate(cost)
    if rep is not None:
        rep(1, f"spanning tree of {nvox} voxels, {rows.size} edges")
    g = coo_matrix((cost, (rows, cols)), shape=(nvox, nvox)).tocsr()
    tree = minimum_spanning_tree(g)
    del g
    if rep is not None:
        rep(2, "integrating along the tree")
    # one seed per connected component: the voxel with the best summed edge quality
    lab, ncomp = ndimage.label(mask)
    vq = np.zeros(shape, np.float32)
    for ax in range(3):
        a, b = _face_pair(ax, shape[ax])
        vq[a] += quality_edges[ax]
        vq[b] += quality_edges[ax]
    seeds = ndimage.maximum_position(vq, lab, index=np.arange(1, ncomp + 1))
    seed_idx = np.array([idx[s] for s in seeds], np.int64)
    # a virtual root joined to every seed makes the forest one tree
    tree = tree.tocoo()
    root = nvox
    r = np.concatenate([tree.row, np.full(seed_idx.size, root)])
    c = np.concatenate([tree.col, seed_idx])
    t = coo_matrix((np.ones(r.size), (r, c)), shape=(nvox + 1, nvox + 1)).tocsr()
    _, pred = breadth_first_order(t, root, directed=False, return_predecessors=True)
    pred = pred.astype(np.int64)
    pred[root] = root
    if np.any(pred < 0):
        raise RuntimeError("unwrap: spanning tree does not reach every voxel (internal error)")
    ph = np.concatenate([phase[mask].astype(np.float64), [0.0]])
    jump = -np.round((ph - ph[pred]) / TWO_PI)
    jump[root] = 0.0
    jump[seed_idx] = 0.0  # seeds keep their wrapped value
    k = jump
    anc = pred
    while True:  # pointer doubling: k[n] = sum of jumps on the path to the root
        done = anc == root
        if done.all():
            break
        k = k + np.where(done, 0.0, k[anc])
        anc = anc[anc]
    out = np.zeros(shape, np.float32)
    out[mask] = (ph[:-1] + TWO_PI * k[:-1]).astype(np.float32)
    return out


_HALF_OFFSETS = tuple(o for o in np.ndindex(3, 3, 3) if o > (1, 1, 1))   # 13 of the 26 neighbour offsets


def _offset_pair(off, shape):
    """Index tuples (a, b) of every voxel pair at neighbour offset ``off`` (each entry 0, 1, 2 → −1, 0, +1)."""
    a, b = [], []
    for o, n in zip(off, shape):
        d = o - 1
        a.append(slice(max(0, -d), n - max(0, d)))
        b.append(slice(max(0, d), n - max(0, -d)))
    return tuple(a), tuple(b)


def residual_jumps(u, mask, neighbours: int = 6) -> int:
    """Number of neighbour pairs inside ``mask`` whose unwrapped phases differ by more than π.

    ``neighbours`` 6 (faces) or 26. After exact unwrapping of a phase whose true steps are below π
    there are none; each one left marks a 2π error (or a true step above π, which no spatial
    unwrapper can resolve)."""
    u = np.asarray(u, np.float32)
    mask = np.asarray(mask, bool)
    offs = [o for o in _HALF_OFFSETS if neighbours == 26 or sum(abs(x - 1) for x in o) == 1]
    n = 0
    for off in offs:
        a, b = _offset_pair(off, u.shape)
        n += int(np.count_nonzero(mask[a] & mask[b] & (np.abs(u[b] - u[a]) > np.float32(np.pi))))
    return n


def fix_residual_wraps(u, mask, max_rounds: int = 20) -> tuple[np.ndarray, int]:
    """Shift by 2π every voxel whose unwrapped phase differs by more than π from MOST of its in-mask
    26-neighbours, all in the same direction; repeated until nothing changes. Returns (u, voxels shifted).

    The spanning tree never leaves a jump above π along its own edges, so a voxel (or a thin
    protrusion) that the tree reached through one bad edge — typically at the mask's edge next to
    an air cavity — shows its 2π error only against its other neighbours. Checking all 26 catches
    the voxels that hang on the mask by a face and a few edges or corners."""
    u = np.array(u, np.float32, copy=True)
    mask = np.asarray(mask, bool)
    shape = u.shape
    shifted = 0
    pi = np.float32(np.pi)
    for _ in range(max_rounds):
        cnt = np.zeros(shape, np.int16)
        up = np.zeros(shape, np.int16)
        down = np.zeros(shape, np.int16)
        for off in _HALF_OFFSETS:
            a, b = _offset_pair(off, shape)
            both = mask[a] & mask[b]
            d = u[b] - u[a]
            hi = both & (d > pi)
            lo = both & (d < -pi)
            cnt[a] += both
            cnt[b] += both
            up[a] += hi        # b is 2π above a: a should move up
            down[b] += hi
            down[a] += lo
            up[b] += lo
        move_up = mask & (2 * up > cnt)
        move_down = mask & (2 * down > cnt)
        n = int(np.count_nonzero(move_up) + np.count_nonzero(move_down))
        if n == 0:
            break
        u[move_up] += np.float32(TWO_PI)
        u[move_down] -= np.float32(TWO_PI)
        shifted += n
    return u, shifted


def _global_correction(u, mask):
    """Subtract the 2π multiple that brings the median inside the mask into (−π, π]."""
    med = float(np.median(u[mask]))
    return (u - np.float32(TWO_PI * np.round(med / TWO_PI))) * mask


def _echoes_from_template(wrapped, unwrapped_t, t_idx, te, mask, individual=None):
    """Unwrap every echo against the TE-scaled template (voxel-wise, or one shift per echo)."""
    ne = wrapped.shape[3]
    out = np.empty(wrapped.shape, np.float32)
    for e in range(ne):
        ref = unwrapped_t * np.float32(te[e] / te[t_idx])
        if e == t_idx:
            out[..., e] = unwrapped_t
        elif individual is None:
            out[..., e] = (wrapped[..., e] + TWO_PI * np.round((ref - wrapped[..., e]) / TWO_PI)) * mask
        else:
            u = individual[e]
            shift = np.round(np.median((ref - u)[mask]) / TWO_PI)
            out[..., e] = (u + np.float32(TWO_PI * shift)) * mask
    return out


# --------------------------------------------------------------------------------------- methods
@dataclass
class QualityUnwrapParams:
    echo_mode: str = param("template", "multi-echo: unwrap the template echo and the others against it voxel-wise, "
                           "or each echo spatially then a global 2π shift", choices=("template", "individual"))
    template_echo: int = param(1, "echo (1-based) that is unwrapped spatially in multi-echo data", min=1, max=64)
    use_magnitude: bool = param(True, "use the magnitude in the edge quality (coherence and brightness)")
    fix_jumps: bool = param(True, "after the tree: shift by 2π the voxels that differ by more than π from most of "
                            "their 26 neighbours (voxels hanging on the mask's edge by one bad edge)")


@dataclass
class LaplacianUnwrapParams:
    form: str = param("differences", "Laplacian of the phase from wrapped neighbour differences (exact when steps < π) "
                      "or Schofield & Zhu's cos·∇²sin − sin·∇²cos", choices=("differences", "sincos"))
    pad_factor: float = param(1.5, "zero padding of the FFT grid (x each dimension)", min=1.0, max=3.0)


def unwrap_quality(phase, params: QualityUnwrapParams | None = None, *, magnitude=None, mask=None,
                   voxel_size=(1.0, 1.0, 1.0), te=None, device="auto", progress=None, cancel=None) -> np.ndarray:
    """Exact quality-guided (maximum-spanning-tree) unwrapping; see the module docstring."""
    p = params or QualityUnwrapParams()
    ph, mag, msk, t, was3d = check_phase_inputs(phase, magnitude, mask, te)
    ne = ph.shape[3]
    ti = min(max(int(p.template_echo), 1), ne) - 1
    rep = Reporter(progress, cancel, total=3 + (ne - 1 if p.echo_mode == "individual" else 0), stage="unwrap")
    rep(0, "edge quality")

    def one(e, step):
        m = None
        if mag is not None and p.use_magnitude:
            m = mag[..., min(e, mag.shape[3] - 1)]
        ph2 = ratio = None
        if ne > 1:
            e2 = e + 1 if e + 1 < ne else e - 1
            ph2, ratio = ph[..., e2], t[e2] / t[e]
        q = edge_quality(ph[..., e], m, ph2, ratio)
        check_cancel(cancel)
        u = _tree_unwrap(ph[..., e], q, msk, rep if step else None)
        if p.fix_jumps:
            u, _ = fix_residual_wraps(u, msk)
        return _global_correction(u, msk)

    ut = one(ti, True)
    if ne == 1:
        rep(3, "done")
        return ut
    indiv = None
    if p.echo_mode == "individual":
        indiv = {}
        for n, e in enumerate(x for x in range(ne) if x != ti):
            indiv[e] = one(e, False)
            rep(3 + n, f"echo {e + 1}")
    out = _echoes_from_template(ph, ut, ti, t, msk, indiv)
    rep(rep.total, "done")
    return out


def _laplacian_symbol(shape, voxel_size, dev):
    """k-space symbol of the 7-point discrete Laplacian (1/mm²) on the rfft half grid."""
    ks = kspace_grid(shape, voxel_size, dev, torch.float64, half=True)
    vs = check_voxel_size(voxel_size)
    lap = 0.0
    for k, d in zip(ks, vs):
        lap = lap + (2.0 * torch.cos(2.0 * np.pi * k * d) - 2.0) / (d * d)
    return lap


def _wrapped_laplacian(x, voxel_size):
    """Σ over face neighbours of wrap(φ_j − φ_0)/Δ² (the discrete Laplacian of the true phase when steps < π)."""
    out = torch.zeros_like(x)
    for ax, d in enumerate(check_voxel_size(voxel_size)):
        g = torch.diff(x, dim=ax)
        g = torch.remainder(g + np.pi, TWO_PI) - np.pi
        g = g / float(d * d)
        n = x.shape[ax]
        out.narrow(ax, 0, n - 1).add_(g)   # φ_{i+1} − φ_i seen from i
        out.narrow(ax, 1, n - 1).sub_(g)   # φ_i − φ_{i+1} seen from i+1
    return out


def _laplacian_unwrap_3d(ph, voxel_size, pad_factor, dev, form="differences"):
    shape = ph.shape
    pshape = fast_shape(shape, pad_factor)
    L = _laplacian_symbol(pshape, voxel_size, dev)
    Linv = torch.where(L.abs() > 1e-12, 1.0 / L, torch.zeros_like(L)).to(torch.float32)
    L = L.to(torch.float32)
    x = torch.as_tensor(ph, dtype=torch.float32, device=dev)
    c, s = torch.cos(x), torch.sin(x)

    def lap(v):
        V = torch.fft.rfftn(pad_volume(v, pshape), s=pshape)
        return crop_volume(torch.fft.irfftn(V * L, s=pshape), shape)

    rhs = c * lap(s) - s * lap(c) if form == "sincos" else _wrapped_laplacian(x, voxel_size)
    R = torch.fft.rfftn(pad_volume(rhs, pshape), s=pshape)
    u = crop_volume(torch.fft.irfftn(R * Linv, s=pshape), shape)
    return u.cpu().numpy().astype(np.float32)


def unwrap_laplacian(phase, params: LaplacianUnwrapParams | None = None, *, magnitude=None, mask=None,
                     voxel_size=(1.0, 1.0, 1.0), te=None, device="auto", progress=None, cancel=None) -> np.ndarray:
    """Laplacian unwrapping (Schofield & Zhu 2003), NOT exact; see the module docstring."""
    p = params or LaplacianUnwrapParams()
    ph, _, msk, t, was3d = check_phase_inputs(phase, magnitude, mask, te)
    check_voxel_size(voxel_size)
    dev = resolve_device(device)
    ne = ph.shape[3]
    rep = Reporter(progress, cancel, total=ne, stage="unwrap")
    out = np.empty(ph.shape, np.float32)
    with torch.no_grad():
        for e in range(ne):
            rep(e, f"Laplacian unwrap echo {e + 1}/{ne}")
            u = _laplacian_unwrap_3d(ph[..., e], voxel_size, p.pad_factor, dev, p.form)
            # constant: best match to the wrapped phase (mod 2π) inside the mask, then the global 2π rule
            off = np.angle(np.mean(np.exp(1j * (ph[..., e][msk] - u[msk]).astype(np.float64))))
            out[..., e] = _global_correction(u + np.float32(off), msk)
    if ne > 1:  # consistent 2π multiples between echoes (echo 1 as the reference)
        for e in range(1, ne):
            ref = out[..., 0] * np.float32(t[e] / t[0])
            out[..., e] += np.float32(TWO_PI * np.round(np.median((ref - out[..., e])[msk]) / TWO_PI))
            out[..., e] *= msk
    rep(ne, "done")
    return out[..., 0] if was3d else out


STEPS = (
    Step(family="unwrap", name="quality", label="Quality-guided (ROMEO-like)", params_cls=QualityUnwrapParams,
         run=unwrap_quality, default=True, exact=True, order=0,
         doc="Exact path-following unwrapping: maximum spanning tree of edge qualities (phase coherence, magnitude "
             "coherence and brightness, multi-echo gradient coherence), wrapped differences integrated along it from "
             "the best voxel of each mask component; global 2π correction (median in (−π, π]); multi-echo by TE-scaled "
             "template. Exact wherever the true phase step along the tree is below π."),
    Step(family="unwrap", name="laplacian", label="Laplacian (fast, not exact)", params_cls=LaplacianUnwrapParams,
         run=unwrap_laplacian, exact=False, order=10,
         doc="Schofield & Zhu (2003) FFT Laplacian unwrapping in torch: differs from the true phase by a harmonic "
             "function, so use it only before SHARP-type background removal, not for echo fits."),
)
