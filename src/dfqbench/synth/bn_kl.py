"""Q-ASR's synthetic data (Kim et al., ICASSP 2022; kssteven418/Q-ASR@aa1ec2e,
nemo/quantization/utils/distill_data.py `get_synthetic_data`): BatchNorm statistics matched by a Gaussian KL.

A batch starts as U(-init, init) noise (the code: `torch.rand(size) * 0.6 - 0.3`) and is optimized by Adam with
ReduceLROnPlateau(patience 25, min_lr 1e-4) on the loss, summed over every conv -> BatchNorm pair, of
``mean_c KL(N(mu_BN, sigma_BN) || N(mu_conv, sigma_conv))``: mu_BN the running mean, sigma_BN =
sqrt(running_var + 1e-6); mu_conv / sigma_conv the batch statistics of the conv output (= the BN input) over batch
and time, sigma_conv = sqrt(unbiased var + 1e-6) (the code's `torch.var(x + eps, dim=(0, 2))`, then
`sqrt(var + eps)`). No cross-entropy, no input prior. The loop is the shared one (`bn_loop`); the BN input tapped
there is the conv output when, as in QuartzNet, each BatchNorm directly follows its conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .bn_loop import EPS, ImageBatch, Synthesis, synthesize_batches


@dataclass
class QASRSettings:
    batch_size: int = 8
    num_batches: int = 50
    iterations: int = 200
    lr: float = 0.01
    patience: int = 25
    min_lr: float = 1e-4
    init_range: float = 0.3  # U(-0.3, 0.3) at aa1ec2e (an earlier commit: U(-0.1, 0.1))


def gaussian_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor,
                std_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std_p) || N(mean_q, std_q)) per element: log(std_q / std_p) + (std_p^2 + (mean_p -
    mean_q)^2) / (2 std_q^2) - 1/2 (the code's `_kl_loss` before its mean)."""
    return torch.log(std_q / std_p) + (std_p ** 2 + (mean_p - mean_q) ** 2) / (2 * std_q ** 2) - 0.5


def batch_moments(x: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sqrt(var + EPS) over every dim but 1 (batch and time; batch, H, W); Q-ASR's code
    takes the unbiased variance, KW's reconstruction the biased one."""
    dims = (0, *range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, unbiased=unbiased)
    return mean, torch.sqrt(var + EPS)


def bn_kl_loss(pairs, unbiased: bool = True) -> torch.Tensor:
    """Sum over (BN input, (running mean, sqrt(running var + EPS))) of the channel mean of
    KL(N(BN) || N(batch)) (Q-ASR; KW)."""
    loss = 0.0
    for activation, (mean_t, std_t) in pairs:
        mean, std = batch_moments(activation, unbiased)
        loss = loss + gaussian_kl(mean_t, std_t, mean, std).mean()
    return loss


class QASRSynthesis(Synthesis):
    what = "Q-ASR BatchNorm-KL synthesis"
    name = "qasr"

    def __init__(self, input_shape: tuple[int, ...], settings: QASRSettings, generator: torch.Generator,
                 device: torch.device):
        self.input_shape, self.settings, self.generator, self.device = tuple(input_shape), settings, generator, device
        self.num_batches, self.iterations = settings.num_batches, settings.iterations

    def new_batch(self, index: int) -> ImageBatch:
        s = self.settings
        x = (torch.rand((s.batch_size, *self.input_shape), generator=self.generator) * 2 - 1) * s.init_range
        return ImageBatch(x.to(self.device), s.lr, s.patience, s.min_lr, channels_last=len(self.input_shape) == 3)

    def loss(self, batch, x, logits, taps) -> torch.Tensor:
        return bn_kl_loss(taps.pairs())


def qasr_synthetic_data(model: nn.Module, input_shape: tuple[int, ...], settings: QASRSettings,
                        generator: torch.Generator, device: torch.device, progress: bool = False) -> list[torch.Tensor]:
    return synthesize_batches(model, QASRSynthesis(input_shape, settings, generator, device), device, progress)
