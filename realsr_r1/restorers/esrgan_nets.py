"""Real-ESRGAN's networks in PyTorch, and loading them from a converted safetensors file.

They follow Real-ESRGAN/BasicSR (parameter names included, so their state dicts load): RRDBNet
(x4plus: 23 residual-in-residual dense blocks, 64 features, growth 32, ×4 by two nearest ×2
upsamplings) and SRVGGNetCompact (animevideov3: 16 plain convs with PReLU, pixel shuffle, plus the
nearest-upsampled input). A module of its own so that the tiling restorer (esrgan.py) imports
torch only when PyTorch runs the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import weights


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class ResidualDenseBlock(nn.Module):
    """Five 3×3 convs, each seeing all earlier features; the result scaled by 0.2 onto the input."""

    def __init__(self, num_feat: int = 64, grow: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + grow, grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * grow, grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * grow, grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * grow, num_feat, 3, 1, 1)

    def forward(self, x):
        feats = [x.to(_compute_dtype(x))]  # concatenate in the convs' dtype, not the fp32 trunk's
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2, inplace=True))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int = 64, grow: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, grow)
        self.rdb2 = ResidualDenseBlock(num_feat, grow)
        self.rdb3 = ResidualDenseBlock(num_feat, grow)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """×4 RRDBNet on plain RGB in [0, 1] (Real-ESRGAN x4plus)."""

    scale = 4
    strip = 64  # rows (at 2x) per strip of the 4x tail

    def __init__(self, num_feat: int = 64, num_block: int = 23, grow: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, grow) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, x):
        # Under bf16/fp16 autocast the convs run in low precision, but the residual trunk stays
        # fp32 (69 residual sums) and so does the last conv, whose output is the image: in bf16
        # its 8-bit mantissa alone shifted PSNR by ~0.03 dB. Both cost ~2% of the time.
        feat = self.conv_first(x).float()
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        # The last three convs run at 4x resolution, where one 64-channel map of a 288² tile takes
        # 340 MB in fp32: run them over strips of rows, each with the 2 rows of context they need
        # (exact, and the tile's peak memory drops to about a third).
        h = feat.shape[2]
        return torch.cat([self._tail(feat, r0, min(h, r0 + self.strip)) for r0 in range(0, h, self.strip)], 2)

    def _tail(self, feat, r0: int, r1: int):
        a, b = max(0, r0 - 2), min(feat.shape[2], r1 + 2)
        y = F.interpolate(feat[:, :, a:b], scale_factor=2, mode="nearest")
        y = F.leaky_relu(self.conv_up2(y), 0.2, inplace=True)
        y = F.leaky_relu(self.conv_hr(y), 0.2, inplace=True)
        with torch.autocast(feat.device.type, enabled=False):
            y = self.conv_last(y.float())
        return y[:, :, 2 * (r0 - a):2 * (r1 - a)]


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact net (animevideov3): learns the residual over nearest upsampling."""

    def __init__(self, num_feat: int = 64, num_conv: int = 16, scale: int = 4):
        super().__init__()
        self.scale = scale
        layers = [nn.Conv2d(3, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, 3 * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.upsampler(self.body(x)) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


ARCHS = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}


def load_model(path: str | Path) -> nn.Module:
    """The network stored in a converted safetensors file (architecture from its metadata)."""
    state, meta = weights.load_state_dict(path)
    arch = meta.get("arch", "RRDBNet")
    if arch not in ARCHS:
        raise weights.CorruptWeightsError(f"{path}: unknown architecture {arch!r} in its metadata")
    model = ARCHS[arch]()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise weights.CorruptWeightsError(f"{path}: tensors do not fit {arch} ({first})") from None
    return model.eval().requires_grad_(False)
