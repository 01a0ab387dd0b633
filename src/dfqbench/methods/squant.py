"""SQuant (Guo et al., ICLR 2022): on-the-fly data-free quantization via a diagonal Hessian approximation.

Weights: the convention's grid, then SQuant's progressive flipping instead of round-to-nearest. With rounding
errors e = round(x) - x (x in grid units), SQuant-E rounds to nearest; SQuant-K, in every kernel (one output x
one input channel), flips the round(|sum e|) elements with the largest |e| toward the other integer so that
|sum e| <= 0.5 over the kernel (the CASE constraint); SQuant-C then does the same over each output channel,
where each kernel offers a single candidate: the next element it would have flipped (if it stopped short of its
sum) or its last flipped element, flipped back (if it overshot). All of it is batched torch ops: one sort per
stage, no loop over kernels or elements.

Activations: no data. Each quantizer's clip alpha = s * std of its input's positive values (all values, / 1.25,
when the tensor is signed), measured in one forward pass of a batch of uniform-noise images through the
already-quantized model (each quantizer is set when the pass first reaches it, so later layers see quantized
inputs); s depends on the run's activation bit-width (one s for every quantizer, the 8-bit FC input too, as the
official code's single -s; sigma_from=quantizer takes each quantizer's own bits), and alpha is capped at the
tensor's max below 6 bits (the quantizer's bits).
"""

from __future__ import annotations

import time

import torch

from ..quant import act_quantizers, quant_layers, quantize_model
from ..quant.quantizers.precomputed import PrecomputedWeightQuantizer
from .base import Method
from ..settings import check_int

MODES = ("e", "ek", "ekc")
SIGMA_FROM = ("abit", "quantizer")  # the clip multiplier s of the run's abit (official), or of each quantizer's bits
_NOT_A_CANDIDATE = -1.0


def _flip_stage(e: torch.Tensor, prio_up: torch.Tensor, prio_down: torch.Tensor):
    """One SQuant stage over groups (rows of e, [G, N]).

    prio_up / prio_down hold |e| for the elements that may move up / down (-1 elsewhere). Each group flips its
    round(|sum e|) highest-priority candidates in the direction that reduces |sum e|. Returns the flips (+1/-1/0)
    and, per group, the single candidate offered to the next stage as new (prio_up, prio_down).
    """
    total = e.sum(-1)
    go_up = total < 0
    prio = torch.where(go_up[:, None], prio_up, prio_down)
    is_cand = prio >= 0
    n = torch.minimum(total.abs().round(), is_cand.sum(-1).to(e.dtype))
    order = prio.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(e.shape[1], device=e.device).expand_as(order))
    flip = is_cand & (rank < n[:, None])
    delta = flip.to(e.dtype) * torch.where(go_up, 1.0, -1.0).to(e.dtype)[:, None]
    e_new = e + delta
    # the next stage's candidate: the last flipped element, flipped back, when the group overshot its sum;
    # otherwise the next element in line (none when the sum is exactly 0)
    over = (n > 0) & (n >= total.abs())
    under = ~over & (total != 0)
    last = is_cand & (rank == (n - 1)[:, None]) & over[:, None]
    nxt = is_cand & (rank == n[:, None]) & under[:, None]
    up_next = (last & ~go_up[:, None]) | (nxt & go_up[:, None])
    down_next = (last & go_up[:, None]) | (nxt & ~go_up[:, None])
    mag = e_new.abs()
    return (delta, torch.where(up_next, mag, _NOT_A_CANDIDATE), torch.where(down_next, mag, _NOT_A_CANDIDATE))


def squant_round(x: torch.Tensor, lo, hi, mode: str = "ekc") -> torch.Tensor:
    """Round x ([O, I, K]: output channel, input channel, kernel element; grid units) to integers in [lo, hi].

    lo / hi are numbers or tensors broadcastable to x (per output channel: shape [O, 1, 1]). Elements within half
    a step outside [lo, hi] keep their rounding error in the sums (they may not flip outward) and are clamped
    after the flips, as in the official code; elements further out are clamped before (error 0)."""
    if mode not in MODES:
        raise ValueError(f"SQuant mode={mode!r} is not valid; choose one of: {', '.join(MODES)}")
    o, i, k = x.shape
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device).expand_as(x)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device).expand_as(x)
    # the rounding error before the clamp, as the official code computes it (quant_modules.py adaptive_round:
    # round, error, flips, then clamp): a min/max grid's rounded zero point puts a channel's extremes up to half a
    # step outside [lo, hi], and their error counts in the sums. Elements further out (a clipping estimator cut
    # them) are clamped first: their error is the clip's, not a rounding's.
    near = (x >= lo_t - 0.5) & (x <= hi_t + 0.5)
    x = torch.where(near, x, torch.minimum(torch.maximum(x, lo_t), hi_t))
    r = torch.round(x)
    if mode == "e":
        return torch.minimum(torch.maximum(r, lo_t), hi_t)
    e = r - x
    prio_up = torch.where((e < 0) & (x < hi_t), -e, _NOT_A_CANDIDATE)  # rounded down, room to go up
    prio_down = torch.where((e > 0) & (x > lo_t), e, _NOT_A_CANDIDATE)
    delta, prio_up, prio_down = _flip_stage(e.reshape(o * i, k), prio_up.reshape(o * i, k),
                                            prio_down.reshape(o * i, k))
    if mode == "ekc":
        e_k = e.reshape(o, i * k) + delta.reshape(o, i * k)
        delta_c, _, _ = _flip_stage(e_k, prio_up.reshape(o, i * k), prio_down.reshape(o, i * k))
        delta = delta.reshape(o, i * k) + delta_c
    return torch.minimum(torch.maximum(r + delta.reshape(o, i, k), lo_t), hi_t)


def sigma_for_bits(bits: int, sigmas: dict[int, float]) -> float:
    """The clip multiplier s: the paper's value at its bit-widths, linear in between, constant outside."""
    points = sorted(sigmas.items())
    if bits <= points[0][0]:
        return points[0][1]
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if bits <= b1:
            return s0 + (s1 - s0) * (bits - b0) / (b1 - b0)
    return points[-1][1]


def _std_of_positives(x: torch.Tensor) -> float:
    """Unbiased std of the positive entries of a tensor >= 0, without a boolean-indexed copy (large tensors)."""
    n = float(torch.sign(x).sum())
    if n < 2:
        return 0.0
    c = float(x.sum()) / n  # their mean; the zeros add (0 - c)^2 each to the shifted sum of squares
    shifted = float(torch.sub(x, c).square_().sum()) - (x.numel() - n) * c * c
    return max(shifted, 0.0) ** 0.5 / (n - 1) ** 0.5


def squant_clip(x: torch.Tensor, bits: int, sigmas: dict[int, float], signed_divisor: float = 1.25,
                cap_below_bits: int = 6, sigma_bits: int | None = None) -> tuple[float, float]:
    """SQuant's activation range for tensor x: (0, alpha) if x >= 0, else (-alpha, alpha).

    `bits` is the quantizer's bit-width (the cap below `cap_below_bits` uses it); the multiplier s is the one of
    `sigma_bits` (default: `bits`)."""
    x = x.detach().float()
    s = sigma_for_bits(bits if sigma_bits is None else sigma_bits, sigmas)
    x_min, x_max = (float(v) for v in torch.aminmax(x))
    signed = x_min < 0
    if signed:
        alpha = s * float(x.std()) / signed_divisor
    else:
        alpha = s * _std_of_positives(x) if x_max > 0 else 0.0
    if bits < cap_below_bits:
        alpha = min(alpha, x_max)
    return (-alpha if signed else 0.0), alpha


class SQuantWeightQuantizer(PrecomputedWeightQuantizer):
    def __init__(self, bits: int, mode: str = "ekc", **kwargs):
        super().__init__(bits, **kwargs)
        self.mode = mode
        self.flipped = 0  # elements rounded away from the nearest grid point

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        self.grid = grid = self.make_grid(weight)
        view = (-1,) + (1,) * (weight.dim() - 1) if self.per_channel else (1,) * weight.dim()
        scale, zp = grid.scale.reshape(view), grid.zero_point.reshape(view).float()
        u = weight * (1.0 / scale)  # as ATen's fake quant: round(w * (1/scale)) + zp, clamped
        lo, hi = grid.qmin - zp, grid.qmax - zp
        shape3 = (weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1, -1)
        u3 = u.reshape(shape3)
        bound = (lambda t: t.reshape(-1, 1, 1)) if self.per_channel else (lambda t: t.reshape(1, 1, 1))
        q = squant_round(u3, bound(lo), bound(hi), self.mode)
        self.flipped = int((q != torch.round(torch.clamp(u3, bound(lo), bound(hi)))).sum())
        return (q.reshape(weight.shape) * scale).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, squant={self.mode}"


def _check_sigmas(sigmas) -> dict[int, float]:
    try:
        out = {int(k): float(v) for k, v in dict(sigmas).items()}
    except (TypeError, ValueError):
        raise ValueError(f"method.clip_sigmas={sigmas!r} must map bit-widths to multipliers, "
                         f"e.g. {{4: 12, 6: 14, 8: 25}}") from None
    if not out or any(not 2 <= b <= 32 or s <= 0 for b, s in out.items()):
        raise ValueError(f"method.clip_sigmas={sigmas!r} must be non-empty with bit-widths in 2..32 and "
                         f"multipliers > 0")
    return out


class SQuant(Method):
    def __init__(self, name: str = "squant", mode: str = "ekc", clip_sigmas: dict | None = None,
                 signed_divisor: float = 1.25, cap_below_bits: int = 6, batch_size: int = 256, noise_seed: int = 0,
                 sigma_from: str = "abit", **kwargs):
        super().__init__(name, **kwargs)
        if mode not in MODES:
            raise ValueError(f"method.mode={mode!r} is not valid; choose one of: {', '.join(MODES)}")
        check_int("method.batch_size", batch_size, 2)
        if not signed_divisor > 0:
            raise ValueError(f"method.signed_divisor={signed_divisor!r} must be > 0")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < 0:
            raise ValueError(f"method.noise_seed={noise_seed!r} must be a non-negative integer")
        if sigma_from not in SIGMA_FROM:
            raise ValueError(f"method.sigma_from={sigma_from!r} is not valid; choose one of: {', '.join(SIGMA_FROM)}")
        self.mode, self.batch_size, self.noise_seed, self.sigma_from = mode, batch_size, noise_seed, sigma_from
        self.sigmas = _check_sigmas(clip_sigmas if clip_sigmas is not None else {4: 12.0, 6: 14.0, 8: 25.0})
        self.signed_divisor, self.cap_below_bits = signed_divisor, cap_below_bits

    def quantize(self, model, ctx):
        t0 = time.perf_counter()
        qmodel = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        flipped = total = 0
        with torch.no_grad():
            for layer in quant_layers(qmodel):
                wq = SQuantWeightQuantizer.like(layer.weight_quantizer, mode=self.mode)
                layer.weight_quantizer = wq
                layer.quantized_weight()  # eagerly, so the flipping is part of the timed quantization
                flipped, total = flipped + wq.flipped, total + layer.weight.numel() * wq.enabled
        ctx.info["squant_weight_time_s"] = round(time.perf_counter() - t0, 4)
        ctx.info["squant_flipped_fraction"] = round(flipped / max(total, 1), 6)
        t1 = time.perf_counter()
        self._set_activation_ranges(qmodel, ctx)
        ctx.info["squant_act_time_s"] = round(time.perf_counter() - t1, 4)
        return qmodel

    @torch.no_grad()
    def _set_activation_ranges(self, qmodel, ctx) -> None:
        # raw U(0, 1) pixels, not normalized: what the paper's code feeds the model
        gen = torch.Generator(device="cpu").manual_seed(self.noise_seed)
        noise = torch.rand((self.batch_size, *ctx.input_shape), generator=gen).to(ctx.device)
        done: set = set()
        # the official code takes one multiplier per run (-s, run.sh: the run's bit-width) for every quantizer,
        # the 8-bit FC input too
        sigma_bits = ctx.abit if self.sigma_from == "abit" else None

        def set_on_first_call(quantizer, args):
            if quantizer not in done:
                done.add(quantizer)
                quantizer.set_range(*squant_clip(args[0], quantizer.bits, self.sigmas, self.signed_divisor,
                                                 self.cap_below_bits, sigma_bits))

        handles = [q.register_forward_pre_hook(set_on_first_call) for q in act_quantizers(qmodel) if q.enabled]
        if not handles:  # float activations: nothing to measure
            return
        try:
            qmodel.eval()
            qmodel(noise.contiguous(memory_format=torch.channels_last))
        finally:
            for h in handles:
                h.remove()
