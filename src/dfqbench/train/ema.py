"""GDFQ's activation-range calibration: an exponential moving average of each batch's range, bias-corrected.

For every activation quantizer, m_t = beta * m_{t-1} + (1 - beta) * r_t from m_0 = 0, and the range used is
m_t / (1 - beta^t) (Adam's bias correction: the first batch's range is used as is). The batch range r_t is the
min/max of the tensor, per channel for per-channel quantizers; for another range estimator of the convention
(percentile, mse) it is that estimator on a random subsample of the batch. The observer drives
`ActQuantizer.set_range` from a forward pre-hook while `active`, so the forward that observes a batch already
quantizes with the updated range (as GDFQ's QuantAct does); `close()` leaves the last range frozen.
With `mode="running_minmax"` the range is instead the running min of the batch minima and max of the maxima
(ZAQ's QuantAct, which never freezes it during training).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.quantizers import ActQuantizer
from ..quant.quantizers.ranges import estimate_range

_SUBSAMPLE = 1 << 14  # values per batch for the searched estimators (mse: 100 candidate ranges each)


MODES = ("ema", "running_minmax")


class EMARangeObserver:
    def __init__(self, model: nn.Module, beta: float = 0.9, generator: torch.Generator | None = None,
                 mode: str = "ema"):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ema_beta={beta!r} must be in [0, 1)")
        if mode not in MODES:
            raise ValueError(f"range tracking mode {mode!r} is not valid; valid: {list(MODES)}")
        self.beta, self.mode, self.active, self._rng = beta, mode, True, generator
        self.quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.enabled]
        self.state: list[dict] = [{"t": 0, "lo": None, "hi": None} for _ in self.quantizers]
        self._handles = [q.register_forward_pre_hook(self._hook(i)) for i, q in enumerate(self.quantizers)]

    def _hook(self, index: int):
        def observe(module: ActQuantizer, inputs):
            if self.active:
                self.update(index, inputs[0])
        return observe

    @torch.compiler.disable  # Python state (the step count t, the RNG): traced, it would recompile every step
    @torch.no_grad()
    def update(self, index: int, x: torch.Tensor) -> None:
        q, s = self.quantizers[index], self.state[index]
        lo, hi = batch_range(q, x, self._rng)
        s["t"] += 1
        if self.mode == "running_minmax":
            s["lo"] = lo.clone() if s["lo"] is None else torch.minimum(s["lo"], lo)
            s["hi"] = hi.clone() if s["hi"] is None else torch.maximum(s["hi"], hi)
            q.set_range(s["lo"].clone(), s["hi"].clone())
            return
        if s["lo"] is None:
            s["lo"], s["hi"] = torch.zeros_like(lo), torch.zeros_like(hi)
        s["lo"].mul_(self.beta).add_(lo, alpha=1 - self.beta)
        s["hi"].mul_(self.beta).add_(hi, alpha=1 - self.beta)
        correction = 1.0 - self.beta ** s["t"]
        q.set_range(s["lo"] / correction, s["hi"] / correction)

    def close(self) -> None:
        """Stop observing for good: every range stays at its last value."""
        for h in self._handles:
            h.remove()
        self._handles, self.active = [], False

    def state_dict(self) -> list[dict]:
        return [dict(s) for s in self.state]

    def load_state_dict(self, state: list[dict]) -> None:
        if len(state) != len(self.state):
            raise ValueError("EMA observer state does not match the model's activation quantizers")
        self.state = [dict(s) for s in state]


def batch_range(q: ActQuantizer, x: torch.Tensor, rng: torch.Generator | None = None):
    """The range of one batch as quantizer `q` would estimate it (per channel along dim 1 if it is per-channel)."""
    x = x.detach().float()
    per_channel = getattr(q, "per_channel", False) and x.dim() > 1
    flat = x.transpose(0, 1).reshape(x.shape[1], -1) if per_channel else x.reshape(1, -1)
    if q.estimator == "minmax":
        lo, hi = torch.aminmax(flat, dim=1)
    else:
        if flat.shape[1] > _SUBSAMPLE:
            idx = torch.randint(flat.shape[1], (_SUBSAMPLE,), generator=rng).to(flat.device)
            flat = flat[:, idx]
        lo, hi = estimate_range(flat, q.estimator, q.bits, q.symmetric, per_channel=True,
                                percentile=q.percentile, lp=q.lp)
    return (lo, hi) if per_channel else (lo[0], hi[0])
