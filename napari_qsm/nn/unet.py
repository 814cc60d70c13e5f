"""QSMInvNet / QSMInvNet+ : a 3-D U-Net with domain-specific batch normalisation (DSBN).

Architecture (DESIGN.md, "The method"; Liu & Koch, QSMInvNet+):

* 9 convolutions 3x3x3 (same padding), each followed by a (domain-specific) BatchNorm3d and ReLU:
  5 on the way down (levels 0..4, widths w, 2w, 4w, 8w, 16w) and 4 on the way up
  (levels 3..0, widths 8w, 4w, 2w, w);
* 4 max-poolings 2x2x2 (stride 2) between the encoder levels;
* 4 nearest-neighbour upsamplings (x2), each followed by a concatenation with the encoder
  feature map of the same level (4 skip concatenations);
* a final 1x1x1 linear convolution to one channel (χ).

Inputs: 2 channels (local field, brain mask), as in the paper. Output: 1 channel (χ), in the
network's scaled units (see :class:`NetConfig`: ``field_scale`` / ``chi_scale``;
:mod:`napari_qsm.nn.inputs` builds the input). Spatial sizes must be multiples of 16 (4 poolings).

Physics channel (``tkd_delta > 0``, this project's extension, off by default): a third input
channel holds the parameter-free TKD estimate of the same field (threshold δ = ``tkd_delta``, the
scan's own voxel size and B0 direction) and the network output is a correction added to it,
χ = χ_TKD + head(features). The final convolution starts at zero, so an untrained network is
exactly TKD and training only has to learn the streaking and underestimation TKD leaves. The
architecture (9 convolutions, DSBN, 4 poolings, 4 upsamplings, 4 skips, 1x1x1 head) is unchanged.

DSBN (Chang et al., CVPR 2019): every normalisation is a ``ModuleList`` of ``BatchNorm3d``, one per
domain, picked by the ``domain`` label given to ``forward``; all convolution weights are shared.
Domain 0 = synthetic (labelled), domain 1 = the target scan(s). ``num_domains=1`` gives the plain
QSMInvNet (one shared BN). A persistent buffer ``domain_trained`` records which domains have
been trained, so a checkpoint says itself whether its domain-1 BN was adapted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NetConfig:
    """Architecture and input/output normalisation of a QSMInvNet(+) checkpoint."""

    base_width: int = 12          # channels at level 0; level l has base_width * 2**l
    num_domains: int = 2          # 2 = QSMInvNet+ (DSBN), 1 = QSMInvNet
    in_channels: int = 2          # field, mask
    levels: int = 4               # number of poolings (fixed to 4 by the method)
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    field_scale: float = 10.0     # network input = field_ppm * field_scale (mask channel unscaled)
    chi_scale: float = 10.0       # network output = chi_ppm * chi_scale
    tkd_delta: float = 0.0        # > 0: third input channel χ_TKD(δ) and residual output (see module doc)

    def __post_init__(self):
        if self.tkd_delta < 0:
            raise ValueError("tkd_delta must be ≥ 0")
        if self.tkd_delta > 0:
            self.in_channels = 3

    @property
    def has_tkd(self) -> bool:
        return self.tkd_delta > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"network config: unknown keys {sorted(unknown)}")
        return cls(**d)

    @property
    def multiple(self) -> int:
        return 2 ** self.levels


class DSBN(nn.Module):
    """Domain-specific BatchNorm3d: one BN per domain, chosen by ``domain`` at each forward."""

    def __init__(self, channels: int, num_domains: int = 2, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm3d(channels, momentum=momentum, eps=eps) for _ in range(num_domains))

    def forward(self, x: torch.Tensor, domain: int = 0) -> torch.Tensor:
        if not 0 <= domain < len(self.bns):
            raise ValueError(f"domain: expected 0..{len(self.bns) - 1}, got {domain}")
        return self.bns[domain](x)


class ConvBlock(nn.Module):
    """conv 3x3x3 (same padding, no bias: BN follows) -> DSBN -> ReLU."""

    def __init__(self, cin: int, cout: int, num_domains: int, momentum: float, eps: float):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm = DSBN(cout, num_domains, momentum, eps)

    def forward(self, x, domain: int = 0):
        return F.relu(self.norm(self.conv(x), domain), inplace=True)


class QSMInvNet(nn.Module):
    """QSMInvNet+ (``num_domains=2``) or QSMInvNet (``num_domains=1``). See the module docstring."""

    def __init__(self, config: NetConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or NetConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("give either a NetConfig or keyword arguments, not both")
        if cfg.levels != 4:
            raise ValueError("levels: the method uses exactly 4 poolings")
        if cfg.base_width < 1 or cfg.num_domains < 1:
            raise ValueError("base_width and num_domains must be ≥ 1")
        self.config = cfg
        w, nd, m, e = cfg.base_width, cfg.num_domains, cfg.bn_momentum, cfg.bn_eps
        widths = [w * 2 ** l for l in range(cfg.levels + 1)]
        self.widths = widths
        self.down = nn.ModuleList()
        cin = cfg.in_channels
        for c in widths:                       # 5 encoder convolutions (the last is the bottleneck)
            self.down.append(ConvBlock(cin, c, nd, m, e))
            cin = c
        self.up = nn.ModuleList()
        for l in range(cfg.levels - 1, -1, -1):  # 4 decoder convolutions after upsample + concat
            self.up.append(ConvBlock(cin + widths[l], widths[l], nd, m, e))
            cin = widths[l]
        self.head = nn.Conv3d(cin, 1, 1)       # final 1x1x1 linear convolution
        if cfg.has_tkd:                        # residual on χ_TKD: an untrained net returns TKD
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.register_buffer("domain_trained", torch.zeros(nd, dtype=torch.uint8))
        # input/output scales travel with the weights: (field_scale, chi_scale)
        self.register_buffer("io_scale", torch.tensor([cfg.field_scale, cfg.chi_scale], dtype=torch.float32))
        # the TKD threshold of the physics channel travels with the weights too (0 = none)
        self.register_buffer("tkd_delta", torch.tensor(float(cfg.tkd_delta), dtype=torch.float32))

    @property
    def num_domains(self) -> int:
        return self.config.num_domains

    def forward(self, x: torch.Tensor, domain: int = 0) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"input: expected (N, {self.config.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        mult = self.config.multiple
        if any(s % mult for s in x.shape[2:]):
            raise ValueError(f"input: spatial size {tuple(x.shape[2:])} must be a multiple of {mult} (pad first)")
        x_in = x
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x, domain)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool3d(x, 2)
        for blk in self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, domain)
        out = self.head(x)
        if self.config.has_tkd:
            out = out + x_in[:, 2:3]
        return out

    def bn_parameters(self, domain: int | None = None):
        """BatchNorm parameters (all domains, or one)."""
        for mod in self.modules():
            if isinstance(mod, DSBN):
                for d, bn in enumerate(mod.bns):
                    if domain is None or d == domain:
                        yield from bn.parameters()

    def shared_parameters(self):
        """Every parameter that is not a BatchNorm parameter (shared by all domains)."""
        bn = {id(p) for p in self.bn_parameters()}
        return (p for p in self.parameters() if id(p) not in bn)

    def copy_domain(self, src: int, dst: int) -> None:
        """Copy BN parameters and running statistics of domain ``src`` into domain ``dst``."""
        for mod in self.modules():
            if isinstance(mod, DSBN):
                mod.bns[dst].load_state_dict(mod.bns[src].state_dict())

    def mark_trained(self, domain: int) -> None:
        self.domain_trained[domain] = 1

    def default_domain(self) -> int:
        """The highest domain whose BN has been trained (the adapted one when present), else 0."""
        idx = [d for d in range(self.num_domains) if int(self.domain_trained[d])]
        return max(idx) if idx else 0


def receptive_radius(levels: int = 4) -> int:
    """Half-width (voxels) of the receptive field: an output voxel depends on inputs within it.

    Each 3x3x3 conv at level l adds 2**l; each 2x2x2 pooling and nearest upsampling at level l
    (scale 2**l -> 2**(l+1)) adds 2**l - ... bounded by 2**l. Used to size the tile halo so
    that tiled inference equals one pass.
    """
    r = 0
    for l in range(levels + 1):
        r += 2 ** l            # encoder conv at level l
    for l in range(levels):
        r += 2 ** l            # decoder conv at level l
        r += 2 * 2 ** l        # pooling + upsampling misalignment at level l (upper bound)
    return r


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_voxel(config: NetConfig) -> dict:
    """Multiply-add FLOPs (2 per MAC) per input voxel of one forward pass (convolutions only).

    Level l works on 1/8**l of the voxels. Returns ``{"forward": F, "train_step": ~3F}``
    (backward ≈ 2x forward).
    """
    w = [config.base_width * 2 ** l for l in range(config.levels + 1)]
    macs = 0.0
    cin = config.in_channels
    for l, c in enumerate(w):
        macs += 27 * cin * c / 8 ** l
        cin = c
    for l in range(config.levels - 1, -1, -1):
        macs += 27 * (cin + w[l]) * w[l] / 8 ** l
        cin = w[l]
    macs += cin * 1
    fwd = 2.0 * macs
    return {"forward": fwd, "train_step": 3.0 * fwd}


def build_model(config: NetConfig | dict | None = None) -> QSMInvNet:
    if isinstance(config, dict):
        config = NetConfig.from_dict(config)
    return QSMInvNet(config or NetConfig())
