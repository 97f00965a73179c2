"""Tiny networks of the three kinds taps must handle: sequential CNN, residual, token model."""
import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, c=8, classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class TinyResNet(nn.Module):
    def __init__(self, c=8, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer1 = Block(c)
        self.layer2 = Block(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, a class token, two encoder layers, head on the class token."""

    def __init__(self, d=16, patch=4, image=16, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, d) * 0.1)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True) for _ in range(2)
        ])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        for blk in self.blocks:
            t = blk(t)
        return self.head(t[:, 0])
