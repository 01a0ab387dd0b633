"""GZNQ-style images (He, Hu, Wang, Cheng, "Generative Zero-shot Network Quantization", CVPRW 2021; no code):
a RECONSTRUCTION from the abstract, every setting dfqbench's choice (conf/method/gznq.yaml, `source.inferred`).

The abstract: instead of prior work's squared BatchNorm mean/variance loss plus CE, model the *distribution* of
the BN statistics generatively (VAE/GAN-inspired); the images become the calibration set. Here:

* a generator (Genie's decoder, `synth.genie.Generator`: latent -> Linear -> BN -> x2 up -> conv -> BN ->
  LeakyReLU -> x2 up -> conv -> tanh -> BN without affine; narrower: `width` and `width / 2` channels), ONE
  generator trained for `iterations` steps with a fresh z ~ N(0, I) every step (a generative model of the
  data, not per-batch images), Adam(lr, betas (beta1, 0.999));
* the loss, at every BatchNorm input x of the teacher and per channel c (values over the batch and positions),
  is the KL between the synthetic feature distribution p_c and the stored Gaussian q_c = N(mu_c, sigma_c^2)
  (running mean, sqrt(running var + 1e-6)) at the level of distributions, KL(p_c || q_c), in the VAE direction
  (the synthetic "posterior" against the stored "prior"). With the moment-matched Gaussian g_c = N(m_c, s_c^2)
  of p_c (batch mean, sqrt(biased var + 1e-6)) it splits exactly as KL(p||q) = KL(g||q) + J(p), J = H(g) - H(p)
  the negentropy (>= 0, zero iff p is Gaussian). KL(g||q) is closed form; J uses the Gram-Charlier
  approximation J ~ k3^2 / 12 + k4^2 / 48 (k3 the skewness, k4 the excess kurtosis of the standardized values):

      L = sum over BN layers of mean_c [ log(sigma_c / s_c) + (s_c^2 + (m_c - mu_c)^2) / (2 sigma_c^2) - 1/2
                                         + shape_weight * (k3_c^2 / 12 + k4_c^2 / 48) ]

  It is zero exactly when every channel's synthetic distribution has the stored mean and variance and the third
  and fourth moments of a Gaussian, positive otherwise. No CE, no input prior.
* the images: `num_images` fresh samples of the trained generator (train-mode BatchNorm, batches of
  `batch_size`, as during training), in the teacher's normalized input space.

The loop is the shared one (`bn_loop`): one "batch" state, the generator, optimized for `iterations` steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .bn_kl import gaussian_kl
from .bn_loop import EPS, Synthesis, synthesize_batches
from .genie import Generator
from ..settings import CheckedSettings, check_int, check_number


@dataclass
class GZNQSettings(CheckedSettings):
    PREFIX = "method.synthesis"
    iterations: int = 500  # generator steps (a CPU budget; the paper's is unknown)
    batch_size: int = 64  # images per generator step (and per sampling batch)
    latent_dim: int = 128
    width: int = 64  # channels of the generator's first conv (the second has width // 2)
    lr: float = 1e-2  # Genie's generator lr
    beta1: float = 0.5  # Adam betas (beta1, 0.999): the usual GAN generator setting (GDFQ's)
    shape_weight: float = 1.0  # weight of the negentropy term (1 = the KL decomposition's own weight)

    def validate(self, prefix: str = "method.synthesis") -> "GZNQSettings":
        for key in ("iterations", "batch_size", "latent_dim", "width"):
            check_int(f"{prefix}.{key}", getattr(self, key), 2 if key in ("batch_size", "width") else 1)
        check_number(f"{prefix}.lr", self.lr, strict=True)
        if isinstance(self.beta1, bool) or not isinstance(self.beta1, (int, float)) or not 0 <= self.beta1 < 1:
            raise ValueError(f"{prefix}.beta1={self.beta1!r} must be in [0, 1)")
        check_number(f"{prefix}.shape_weight", self.shape_weight)
        return self



def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel (dim 1) over every other dim: mean m, s = sqrt(biased var + EPS), skewness k3 = E[c^3] / s^3
    and excess kurtosis k4 = E[c^4] / s^4 - 3 of the centred values c = x - m."""
    dims = (0, *range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims)
    c = x - mean.view(shape)
    c2 = c * c
    var = c2.mean(dim=dims)
    s2 = var + EPS
    skew = (c2 * c).mean(dim=dims) / s2.pow(1.5)
    kurt = (c2 * c2).mean(dim=dims) / (s2 * s2) - 3.0
    return mean, s2.sqrt(), skew, kurt


def negentropy(skew: torch.Tensor, excess_kurtosis: torch.Tensor) -> torch.Tensor:
    """Gram-Charlier approximation of the negentropy of a standardized variable: k3^2 / 12 + k4^2 / 48."""
    return skew.pow(2) / 12.0 + excess_kurtosis.pow(2) / 48.0


def distribution_kl(x: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor,
                    shape_weight: float = 1.0) -> torch.Tensor:
    """Channel mean of KL(p_c || N(mean_t, std_t^2)) ~ KL(N(m, s^2) || N(mean_t, std_t^2)) + shape_weight * J."""
    mean, std, skew, kurt = channel_moments(x)
    loss = gaussian_kl(mean, std, mean_t, std_t)
    if shape_weight:
        loss = loss + shape_weight * negentropy(skew, kurt)
    return loss.mean()


def gznq_loss(pairs, shape_weight: float = 1.0) -> torch.Tensor:
    """Sum over (BN input, (running mean, sqrt(running var + EPS))) of `distribution_kl`."""
    loss = 0.0
    for activation, (mean_t, std_t) in pairs:
        loss = loss + distribution_kl(activation, mean_t, std_t, shape_weight)
    return loss


class GeneratorState:
    """The batch state the shared loop optimizes: one generator, a fresh latent batch per step."""

    def __init__(self, gen: Generator, settings: GZNQSettings, rng: torch.Generator, device: torch.device):
        self.gen, self.settings, self.rng, self.device = gen, settings, rng, device
        self.opt = torch.optim.Adam(gen.parameters(), lr=settings.lr, betas=(settings.beta1, 0.999))

    def latents(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.settings.latent_dim, generator=self.rng).to(self.device)

    def images(self) -> torch.Tensor:
        return self.gen(self.latents(self.settings.batch_size)).contiguous(memory_format=torch.channels_last)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, index: int, loss: float) -> None:
        self.opt.step()

    @torch.no_grad()
    def sample(self, num_images: int) -> torch.Tensor:
        out = []
        for start in range(0, num_images, self.settings.batch_size):
            n = min(self.settings.batch_size, num_images - start)
            out.append(self.gen(self.latents(max(n, 2)))[:n])  # train-mode BN needs 2 samples
        return torch.cat(out)


class GZNQSynthesis(Synthesis):
    what = "GZNQ's generator"
    name = "gznq"
    num_batches = 1

    def __init__(self, image_shape, num_images: int, settings: GZNQSettings, seed: int, device: torch.device):
        self.image_shape, self.num_images, self.settings = tuple(image_shape), num_images, settings
        self.seed, self.device, self.iterations = seed, device, settings.iterations
        self.rng = torch.Generator().manual_seed(seed)

    def new_batch(self, index: int) -> GeneratorState:
        s = self.settings
        with torch.random.fork_rng(devices=[]):  # G's initialization from the seed, the global RNG untouched
            torch.manual_seed(self.seed * 1_000_003 + 17)
            gen = Generator(self.image_shape, s.latent_dim, c1=s.width, c2=max(1, s.width // 2))
        return GeneratorState(gen.to(self.device).train(), s, self.rng, self.device)

    def loss(self, batch, x, logits, taps) -> torch.Tensor:
        return gznq_loss(taps.pairs(), self.settings.shape_weight)

    def finish(self, model: nn.Module, batch: GeneratorState) -> torch.Tensor:
        return batch.sample(self.num_images)


def gznq_images(model: nn.Module, image_shape, num_images: int, settings: GZNQSettings, seed: int,
                device: torch.device, progress: bool = False) -> torch.Tensor:
    """Train the generator against `model`, then `num_images` samples [N, C, H, W]."""
    synthesis = GZNQSynthesis(image_shape, num_images, settings.validate(), seed, device)
    images, = synthesize_batches(model, synthesis, device, progress)
    return images


def gznq_source(model, ctx, num_images: int, batch_size: int,
                settings: GZNQSettings | None = None) -> list[torch.Tensor]:
    """The `gznq` calibration source, cached per (teacher, settings, number of images, seed)."""
    from .calib_data import _split, cached

    settings = settings or GZNQSettings()
    key = {**asdict(settings), "num_images": num_images}
    batches = cached(ctx, "gznq", key, lambda: [gznq_images(model, ctx.input_shape, num_images, settings,
                                                            ctx.seed, ctx.device, ctx.progress)])
    return _split(torch.cat(batches).to(ctx.device), batch_size)
