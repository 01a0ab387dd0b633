"""dfqbench's own architectures (model source `dfqbench`, `ARCHS`): built with num_classes, weights from
model.checkpoint only (the committed models/<arch>.pt; no download exists).

- seq_conv1d_cifar10: a STAND-IN for a speech model (Q-ASR's Conv1d/BatchNorm1d path), CIFAR-10 read as sequences;
- vgg8_bn_cifar10, mobilenetv2_cifar10: CIFAR-10 members of the teacher pool (MixMix's feature mixing, DFED's
  ensemble) beside pytorchcv's ResNets: a plain VGG-style net with BatchNorm and an inverted-residual
  (depthwise) net, so that the pool spans architecture families;
- vit_cifar10: a small timm VisionTransformer for 32x32 images (the transformer methods' teacher, PSAQ-ViT).
"""

from __future__ import annotations

import torch
from torch import nn


class ColumnsAsSequence(nn.Module):
    """A CIFAR image [N, 3, H, W] read column by column as a sequence [N, 3 * H, W]: time step w is image column
    w, its features the column's pixels, channel-major (feature c * H + h is pixel (c, h, w)). One `flatten`, no
    permute: torch.fx sees a shape-only op (graph.is_passthrough), so quantizer placement and BN-statistics
    propagation see the image itself as the first conv's input; the data pipeline stays the image one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2)


class Conv1dSeqNet(nn.Module):
    """STAND-IN for a speech model (QuartzNet), for Q-ASR's Conv1d/BatchNorm1d path without NeMo or LibriSpeech:
    a small QuartzNet-like 1-D conv classifier of CIFAR-10 images read as 32 time steps x 96 features
    (`ColumnsAsSequence`): blocks Conv1d (no bias) -> BatchNorm1d -> ReLU (plain convolutions, not QuartzNet's
    time-channel separable ones, no residuals), the mean over time, a Linear head. ~255k parameters.
    Not a speech model: its numbers say nothing about WER on LibriSpeech."""

    # (out channels, kernel, stride) per block
    BLOCKS = ((128, 5, 1), (128, 3, 1), (128, 3, 2), (160, 3, 1), (192, 1, 1))

    def __init__(self, num_classes: int = 10, in_features: int = 96):
        super().__init__()
        self.sequence = ColumnsAsSequence()
        layers, c_in = [], in_features
        for c_out, k, stride in self.BLOCKS:
            layers += [nn.Conv1d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm1d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.output = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(self.sequence(x)).mean(dim=2))


class VGGBN(nn.Module):
    """VGG-style CIFAR net: conv 3x3 (no bias) -> BatchNorm -> ReLU stages with 2x2 max-pooling ("M"), global
    average pooling, a Linear head. The default widths (`vgg8`: 6 convolutions) cost ~28M multiply-adds per
    32x32 image, ResNet-20's 41M for scale."""

    CONFIG = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M")

    def __init__(self, num_classes: int = 10, config=CONFIG):
        super().__init__()
        layers, c_in = [], 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.output = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.pool(self.features(x)).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6, 3x3 depthwise -> BN -> ReLU6, 1x1 project -> BN; the
    identity added when the shape allows."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2CIFAR(nn.Module):
    """A MobileNetV2 for 32x32 inputs at width 0.5: stem conv 3x3 stride 2 (depthwise convolutions are slow on
    CPUs: the first blocks run at 16x16), inverted-residual stages (expansion, channels, repeats, stride) down to
    4x4, 1x1 conv to 640, global average pooling, Linear. ~0.6M parameters."""

    STAGES = ((1, 8, 1, 1), (6, 12, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1), (6, 80, 3, 1),
              (6, 160, 1, 1))

    def __init__(self, num_classes: int = 10, stem: int = 16, last: int = 640):
        super().__init__()
        layers = [nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)]
        c_in = stem
        for expand, c_out, repeats, stride in self.STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.output = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.pool(self.features(x)).flatten(1))


def vit_cifar10(num_classes: int = 10) -> nn.Module:
    """A DeiT-like timm VisionTransformer sized for CIFAR (and for training on CPUs): 4x4 patches (64 tokens + the
    class token), width 128, depth 6, 4 heads, MLP ratio 2, pre-norm, GELU, classification from the class token.
    ~0.81M parameters, ~56M multiply-adds per image (ResNet-20: 41M). Trained by scripts/train_vit_teacher.py."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=128, depth=6, num_heads=4,
                             mlp_ratio=2.0, qkv_bias=True, class_token=True, global_pool="token")


ARCHS = {"seq_conv1d_cifar10": Conv1dSeqNet, "vgg8_bn_cifar10": VGGBN, "mobilenetv2_cifar10": MobileNetV2CIFAR,
         "vit_cifar10": vit_cifar10}
STAND_INS = {"seq_conv1d_cifar10": "a speech model (Q-ASR's QuartzNet): CIFAR-10 images read as 32 steps (columns) "
                                   "x 96 features; its numbers say nothing about WER"}
