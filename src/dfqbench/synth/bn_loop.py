"""The one synthesis loop behind every image synthesis against a BatchNorm teacher: ZeroQ's distilled data
(`bn_distill`), DSG (`dsg`), Genie (`genie`) and the labelled IntraQ / HAST sets (`labelled`).

The loop owns what they share: the teacher in eval mode with its parameters frozen (restored afterwards), forward
pre-hooks that keep every BatchNorm2d's input (BatchNorm1d in a 1-D conv net: `bn_layers`; `BNTaps`, with the
running statistics as targets), and per batch the step sequence zero-grad -> forward -> loss -> backward ->
optimizer and scheduler step. A `Synthesis` supplies what differs: how a batch starts and what is optimized
(`new_batch`: the images themselves as an `ImageBatch`, or Genie's generator and latents), the loss, extra hooks
on the teacher (`prepare`: Genie's swing, the penultimate feature) and what a finished batch yields (`finish`).

The teacher's forward and backward run at the config's `precision` (dfqbench.precision): under bf16 autocast the
BN inputs and logits the losses read come back as float32, and the images stay float32. ZeroQ's distillation is
then about 1.25x faster on AVX512-BF16 CPUs at the same W4A4 top-1 (results/bench/bench_zeroq.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import precision
from ..errors import UnsupportedModel
from ..precision import as_float32

EPS = 1e-6  # in the std targets sqrt(running_var + EPS) and the per-sample std

Moments = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # activation -> (mean, std)

def bn_layers(model: nn.Module, what: str) -> list[nn.BatchNorm2d | nn.BatchNorm1d]:
    """The model's BatchNorm2d layers; a model with none (a 1-D conv net: Conv1d -> BatchNorm1d) gives its
    BatchNorm1d layers instead. A 2-D net keeps exactly its BatchNorm2d list (a BatchNorm1d in its head, after a
    Linear, is not tapped, as before)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    if not bns:
        raise UnsupportedModel(f"{what} needs a model with BatchNorm2d (or, in a 1-D net, BatchNorm1d) layers")
    return bns


@contextmanager
def frozen(model: nn.Module):
    """The model's parameters with requires_grad off, each restored to its own flag on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class BNTaps:
    """Keeps each BatchNorm2d's input from the latest forward; `targets` are the layers' (running mean,
    sqrt(running var + EPS)). A context manager: the hooks go on exit."""

    def __init__(self, bns: list[nn.Module]):
        self.bns = bns
        self.targets = [(bn.running_mean.detach(), torch.sqrt(bn.running_var.detach() + EPS)) for bn in bns]
        self.captured: dict[nn.Module, torch.Tensor] = {}
        self.handles = [bn.register_forward_pre_hook(self._keep) for bn in bns]

    def _keep(self, module, inputs):
        self.captured[module] = as_float32(inputs[0])  # under bf16 autocast a bf16 conv output

    def clear(self) -> None:
        self.captured.clear()

    def inputs(self) -> list[torch.Tensor]:
        return [self.captured[bn] for bn in self.bns]

    def pairs(self) -> Iterable[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """(BN input, (mean target, std target)) per layer."""
        return zip(self.inputs(), self.targets)

    def __enter__(self) -> "BNTaps":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def sq_l2(target: torch.Tensor | float, value: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance divided by the first dimension of `value` (the images for per-sample statistics, the
    channels for batch statistics)."""
    return (value - target).pow(2).sum() / value.shape[0]


def moment_distance(pairs: Iterable, moments: Moments) -> torch.Tensor:
    """Sum over (activation, (mean target, std target)) of sq_l2 between moments(activation) and the targets."""
    loss = 0.0
    for activation, (mean_t, std_t) in pairs:
        mean, std = moments(activation)
        loss = loss + sq_l2(mean_t, mean) + sq_l2(std_t, std)
    return loss


class ImageBatch:
    """A batch whose images are the optimized variable: Adam, and ReduceLROnPlateau on every step's loss."""

    def __init__(self, x: torch.Tensor, lr: float, patience: int, min_lr: float, channels_last: bool = True):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x.requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, patience=patience, min_lr=min_lr)

    def images(self) -> torch.Tensor:
        """The teacher's input at this step."""
        return self.x

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, index: int, loss: float) -> None:
        self.opt.step()
        self.plateau.step(loss)

    def result(self) -> torch.Tensor:
        return self.x.detach()


class Synthesis:
    """What one method adds to the loop: subclasses set the attributes and implement `new_batch` and `loss`."""

    what = "BatchNorm-statistics synthesis"  # in error messages: "<what> needs a model with BatchNorm2d layers"
    name = "synth"  # in the progress bar
    num_batches = 1
    iterations = 1

    def prepare(self, model: nn.Module, taps: BNTaps) -> list:
        """Once, before the first batch; returns hook handles, removed after the last batch."""
        return []

    def new_batch(self, index: int):
        """The state of batch `index`: an ImageBatch, or an object with the same methods."""
        raise NotImplementedError

    def loss(self, batch, x: torch.Tensor, logits: torch.Tensor, taps: BNTaps) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, model: nn.Module, batch) -> torch.Tensor:
        """The images of a batch whose optimization is done."""
        return batch.result()


def synthesize_batches(model: nn.Module, synthesis: Synthesis, device: torch.device,
                       progress: bool = False) -> list[torch.Tensor]:
    """`synthesis.num_batches` batches, each optimized for `synthesis.iterations` steps against `model`."""
    model = model.eval().to(device)
    batches = []
    autocast = precision.autocast(device)
    with frozen(model), BNTaps(bn_layers(model, synthesis.what)) as taps:
        handles = synthesis.prepare(model, taps)
        try:
            for b in range(synthesis.num_batches):
                batch = synthesis.new_batch(b)
                steps = tqdm(range(synthesis.iterations), desc=f"{synthesis.name} batch {b + 1}/"
                             f"{synthesis.num_batches}", disable=not progress, leave=False)
                for i in steps:
                    batch.zero_grad()
                    taps.clear()
                    x = batch.images()
                    with autocast:
                        logits = model(x)
                    loss = synthesis.loss(batch, x, as_float32(logits), taps)
                    loss.backward()
                    value = loss.item()
                    batch.step(i, value)
                    steps.set_postfix(loss=f"{value:.4g}")
                batches.append(synthesis.finish(model, batch))
        finally:
            for h in handles:
                h.remove()
    return batches
