"""AIT's gradient inundation (Choi et al., CVPR 2022): make every update move some integer weights.

At low learning rates most SGD steps change no quantized weight at all. After the optimizer's step, for each
quantized weight tensor with update d = -lr * (the SGD direction: gradient plus weight decay, with momentum and
Nesterov as the optimizer applies them), GI finds a scale a >= 1 such that at least `threshold`
of the tensor's integer codes differ between quant(w_old) and quant(w_old + a * d): a = 1 if the plain step
already does; otherwise a doubles until it does, then `bisection_steps` halvings of [a/2, a] (stopping early
within threshold / 100) narrow it down; a is the last midpoint tried, as AIT's SGD_adalr returns it. In the
first student epoch AIT's code stops doubling once a > 100 (`disable_adalr`): `cap` (the trainer sets it for
that epoch) does the same. Each tensor is quantized on its own grid (the
convention's weight quantizer, recomputed from the weights as in training; for searched ranges, mse or
percentile, the candidates are read on the grid of w_old). Biases and BatchNorm parameters take the plain step.

d is rebuilt from the gradient and the optimizer's momentum buffer, as AIT's SGD_adalr computes it, not read as
w_new - w_old: a float32 weight of 0.1 moves in steps of 7.5e-9, so a stored difference rounds a smaller step
to 0 or to a whole step, and a scale of 10^2-10^5 multiplies that error (the low learning rates of the last
epochs, where GI scales most).
"""

from __future__ import annotations

import torch

from ..quant.quantizers import is_quant_layer
from ..quant.quantizers.ranges import estimate_range, grid_from_range

_MAX_DOUBLINGS = 40  # a zero update never reaches the threshold: stop at 2^40
FIRST_EPOCH_CAP = 100.0  # AIT's SGD_adalr while disable_adalr: the doubling stops once a > 100 (at 128)


def weight_grid(w: torch.Tensor, wq):
    lo, hi = estimate_range(w, wq.estimator, wq.bits, wq.symmetric, wq.per_channel, lp=wq.lp)
    return grid_from_range(lo, hi, wq.bits, wq.symmetric)


def integer_codes(w: torch.Tensor, wq, grid=None) -> torch.Tensor:
    """The integer weights of `w` on `grid`, by default the grid the quantizer computes from `w` itself."""
    grid = grid if grid is not None else weight_grid(w, wq)
    shape = (-1,) + (1,) * (w.dim() - 1) if wq.per_channel else ()
    scale, zp = grid.scale.reshape(shape), grid.zero_point.reshape(shape)
    return torch.clamp(torch.round(w / scale) + zp, grid.qmin, grid.qmax)


def sgd_step(optimizer: torch.optim.SGD, p: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """The update torch.optim.SGD's last step() applied to `p` (from `w0`), in exact float32 arithmetic instead of
    the difference of two stored weights: -lr * (g + wd * w0, through the momentum buffer, Nesterov or not)."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"gradient inundation rebuilds SGD's step; the optimizer is {type(optimizer).__name__}")
    if p.grad is None:  # no gradient: step() left it alone
        return torch.zeros_like(w0)
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    d = p.grad if not group["weight_decay"] else p.grad.add(w0, alpha=group["weight_decay"])
    if group["momentum"]:
        buf = optimizer.state[p]["momentum_buffer"]  # already updated by step()
        d = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
    return d * (-group["lr"])


class GradientInundation:
    def __init__(self, model: torch.nn.Module, threshold: float, bisection_steps: int = 5):
        self.layers = [m for m in model.modules()
                       if is_quant_layer(m) and m.weight_quantizer.enabled]
        self.threshold, self.bisection_steps = threshold, bisection_steps
        self.cap: float | None = None  # doubling stops once a exceeds it (AIT's first student epoch)
        self.last_scales: list[float] = []

    def snapshot(self) -> list[torch.Tensor]:
        return [layer.weight.detach().clone() for layer in self.layers]

    @torch.no_grad()
    def apply(self, before: list[torch.Tensor], optimizer: torch.optim.SGD) -> None:
        """Call after `optimizer.step()` with the weights from `snapshot()` taken before it."""
        self.last_scales = []
        for layer, w0 in zip(self.layers, before):
            delta = sgd_step(optimizer, layer.weight, w0)
            scale = self.scale_for(w0, delta, layer.weight_quantizer)
            if scale != 1.0:
                layer.weight.copy_(w0 + scale * delta)
            self.last_scales.append(scale)

    def scale_for(self, w0: torch.Tensor, delta: torch.Tensor, wq) -> float:
        grid0 = weight_grid(w0, wq)
        codes0 = integer_codes(w0, wq, grid0)
        # min/max grids are recomputed for every candidate (cheap, as AIT does); a searched range (mse,
        # percentile) would cost a search per candidate, so those candidates are read on the grid of w0
        fixed = None if wq.estimator == "minmax" else grid0

        def changed(a: float) -> float:
            return float((integer_codes(w0 + a * delta, wq, fixed) != codes0).float().mean())

        if changed(1.0) >= self.threshold:
            return 1.0
        a = 1.0
        for _ in range(_MAX_DOUBLINGS):
            a *= 2.0
            if changed(a) >= self.threshold or (self.cap is not None and a > self.cap):
                break
        lo, hi = a / 2.0, a  # changed(lo) < threshold <= changed(hi) (unless capped)
        mid = hi
        for _ in range(self.bisection_steps):
            mid = (lo + hi) / 2.0
            frac = changed(mid)
            if abs(frac - self.threshold) < self.threshold / 100:
                break
            if frac < self.threshold:
                lo = mid
            else:
                hi = mid
        return mid
