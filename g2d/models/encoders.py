"""Per-modality encoders: each maps one modality tensor to a feature vector (B, out_dim)."""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet2d(nn.Module):
    """ResNet trunk (ResNet-18 at width 64, blocks [2,2,2,2], imagenet stem) + global average pool.

    As in the official G2D/OGM-GE code: no pretraining, kaiming init, features are the pooled
    post-ReLU output of the last block. `frames` input (B,C,T,H,W) runs each frame through the
    2-D trunk and averages over time and space.
    """

    def __init__(self, in_ch: int, width: int = 64, blocks=(2, 2, 2, 2), stem: str = "imagenet",
                 frames: bool = False):
        super().__init__()
        self.frames = frames
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True))
        else:
            raise ValueError(f"resnet stem {stem!r} not in (imagenet, small)")
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames:
            b, c, t, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self.layers(self.stem(x))
        if self.frames:
            return y.reshape(b, t, y.shape[1], -1).mean(dim=(1, 3))
        return y.mean(dim=(2, 3))


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, layers: int = 2):
        super().__init__()
        mods, d = [], in_dim
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
            d = hidden
        self.net = nn.Sequential(*mods)
        self.out_dim = d

    def forward(self, x):
        return self.net(x.flatten(1))


class SequenceEncoder(nn.Module):
    """Feature sequences (B, T, D) (UR-Funny, IEMOCAP): per-step MLP, temporal conv, mean pool."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True))
        self.conv = nn.Conv1d(hidden, hidden, 3, padding=1)
        self.out_dim = hidden

    def forward(self, x):
        h = self.proj(x).transpose(1, 2)  # (B, H, T)
        return torch.relu(self.conv(h)).mean(dim=2)


def build_encoder(kind: str, shape: tuple[int, ...], mcfg) -> nn.Module:
    r = mcfg.resnet
    if kind in ("spectrogram", "image"):
        return ResNet2d(shape[0], r.width, tuple(r.blocks), r.stem)
    if kind == "frames":
        return ResNet2d(shape[0], r.width, tuple(r.blocks), r.stem, frames=True)
    if kind == "vector":
        return MLP(shape[0], mcfg.mlp_hidden, mcfg.mlp_layers)
    if kind == "sequence":
        return SequenceEncoder(shape[-1], mcfg.seq_hidden)
    raise ValueError(f"no encoder for modality kind {kind!r}")
