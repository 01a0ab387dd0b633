"""Block reconstruction (BRECQ / QDrop / Genie): a post-training stage that any calibration data feeds.

For each block of the wrapped model (`quant.blocks`), in order: the FP32 block input and output on the
calibration images (the same graph with every quantizer bypassed), and the block input of the quantized model
as reconstructed so far. The block's activation quantizers are initialized on that quantized input with the
convention's estimator (C2: Lp-error search, p = 2.4); then Adam minimizes
    sum over channels of (block_q(x) - block_fp(x_fp))^2, averaged over the rest, + reg_weight * AdaRound reg
over AdaRound rounding logits (lr_round), the weight steps (lr_weight_scale, if learned) and LSQ activation steps
(lr_act_scale), both steps on a cosine schedule. QDrop: the block input takes the FP32 value with probability
qdrop_p per element (else the quantized model's), and every activation quantizer in the block keeps the float
value with probability qdrop_p. The AdaRound regularizer starts after `warmup` of the iterations, its beta falling
linearly from beta_start to beta_end. Finally the rounding is hardened (integer weights stored) and the learned
activation steps become frozen ranges: evaluation is plain fake-quant.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .blocks import Block, block_act_quantizers, block_layers, block_module, find_blocks
from ..quantizers.learned import AdaRoundWeight, HardenedWeightQuantizer, LsqAct, bernoulli_mask, float_mode
from ...settings import CheckedSettings, check_int, check_number

_CHUNK = 128  # images per forward when collecting block inputs/outputs


@dataclass
class ReconstructSettings(CheckedSettings):
    PREFIX = "method.reconstruct"
    iterations: int = 20000  # per block (Genie, BRECQ)
    batch_size: int = 32
    lr_round: float = 1e-3  # AdaRound logits (constant)
    lr_act_scale: float = 4e-5  # LSQ activation steps (cosine)
    lr_weight_scale: float = 1e-4  # weight steps (cosine), when learned
    learn_weight_scale: bool = True  # Genie learns the weight step; BRECQ/QDrop keep it
    learn_act_scale: bool = True
    qdrop_p: float = 0.5  # probability that an element keeps its float value (0 = BRECQ)
    warmup: float = 0.2  # fraction of iterations before the rounding regularizer starts
    beta_start: float = 20.0
    beta_end: float = 2.0
    reg_weight: float = 1.0  # Genie 1.0 (BRECQ/QDrop 0.01 with their loss scale)
    init_act_ranges: bool = True  # re-estimate each block's activation ranges on its quantized input
    # module class names reconstructed whole (blocks.find_blocks): graph blocks inside one instance are merged
    block_units: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "method.reconstruct") -> "ReconstructSettings":
        def bad(key, why):
            raise ValueError(f"{prefix}.{key}={getattr(self, key)!r} {why}")

        for key in ("iterations", "batch_size"):
            check_int(f"{prefix}.{key}", getattr(self, key), 0 if key == "iterations" else 1)
        for key in ("lr_round", "lr_act_scale", "lr_weight_scale", "reg_weight"):
            check_number(f"{prefix}.{key}", getattr(self, key))
        for key in ("qdrop_p", "warmup"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                bad(key, "must be in [0, 1]")
        check_number(f"{prefix}.beta_end", self.beta_end, strict=True)
        if not isinstance(self.beta_start, (int, float)) or self.beta_start < self.beta_end:
            bad("beta_start", f"must be >= beta_end ({self.beta_end})")
        for key in ("learn_weight_scale", "learn_act_scale", "init_act_ranges"):
            if not isinstance(getattr(self, key), bool):
                bad(key, "must be true or false")
        if not isinstance(self.block_units, (list, tuple)) or not all(
                isinstance(u, str) and u for u in self.block_units):
            bad("block_units", "must be a list of module class names, e.g. [BasicBlock, InvertedResidual]")
        return self



def qdrop_mix(x_q: torch.Tensor, x_fp: torch.Tensor, p: float, generator: torch.Generator | None = None):
    """Per element: the FP32 value with probability p, else the quantized model's."""
    if p <= 0.0:
        return x_q
    return torch.lerp(x_q, x_fp, bernoulli_mask(x_q, p, generator))


def output_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the batch and positions (Genie's loss)."""
    return (y - target).pow(2).sum(1).mean()


def _sig(value) -> float:
    return float(f"{float(value):.6g}")


@torch.no_grad()
def _run(module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([module(x[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)])


@torch.no_grad()
def _error(module, x: torch.Tensor, target: torch.Tensor) -> float:
    return float(output_error(_run(module, x), target))


def reconstruct(gm: fx.GraphModule, batches: list[torch.Tensor], settings: ReconstructSettings, seed: int = 0,
                progress: bool = False) -> list[dict]:
    """Reconstruct `gm` (from quantize_model) block by block on `batches` in place; returns per-block facts."""
    gm.eval()
    data = torch.cat([b.detach() for b in batches])
    generator = torch.Generator(device=data.device).manual_seed(seed)
    report = []
    with model_params_frozen(gm):
        fp_in = q_in = data
        for k, block in enumerate(find_blocks(gm, settings.block_units)):
            facts, fp_out, q_out = reconstruct_block(gm, block, fp_in, q_in, settings, generator,
                                                     desc=f"reconstruct block {k + 1} ({block.name})",
                                                     progress=progress)
            report.append(facts)
            fp_in, q_in = fp_out, q_out
    return report


@contextlib.contextmanager
def model_params_frozen(gm: nn.Module):
    """requires_grad off for every parameter the model has now (the quantizers' own ones, created later by the
    reconstruction, are the only ones optimized); restored on exit."""
    params = list(gm.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def reconstruct_block(gm: fx.GraphModule, block: Block, fp_in: torch.Tensor, q_in: torch.Tensor,
                      settings: ReconstructSettings, generator: torch.Generator, desc: str = "reconstruct",
                      progress: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One block of `reconstruct` on given inputs (the FP32 block input `fp_in`, the quantized model's `q_in`):
    returns (facts, FP32 block output, quantized block output after reconstruction). `reconstruct` feeds it the
    propagated calibration images; the layer-wise method (`quant.calibration.layerwise`) one-layer blocks and
    sampled layer-wise data. The caller freezes the model's own parameters."""
    t0 = time.perf_counter()
    sub = block_module(gm, block)
    with float_mode(gm):
        fp_out = _run(sub, fp_in)
    facts = _reconstruct_block(gm, block, sub, fp_in, q_in, fp_out, settings, generator, desc=desc,
                               progress=progress)
    q_out = _run(sub, q_in)
    facts.update(block=block.name, error_after=_sig(output_error(q_out, fp_out)),
                 time_s=round(time.perf_counter() - t0, 2))
    return facts, fp_out, q_out


def _reconstruct_block(gm, block: Block, sub, fp_in, q_in, fp_out, settings: ReconstructSettings, generator,
                       desc: str, progress: bool) -> dict:
    acts = [q for q in block_act_quantizers(gm, block) if q.enabled]
    if settings.init_act_ranges and acts:
        for q in acts:
            q.start_observing()
        _run(sub, q_in[:_CHUNK])  # Genie initializes from one batch; the Lp search is costly on CPU
        for q in acts:
            q.stop_observing()
    layers = [m for m in block_layers(gm, block)
              if m.weight_quantizer.enabled and not isinstance(m.weight_quantizer, HardenedWeightQuantizer)]
    rounders = []
    for layer in layers:
        rounders.append(AdaRoundWeight(layer.weight_quantizer, layer.weight, settings.learn_weight_scale))
        layer.weight_quantizer = rounders[-1]
    lsq = [LsqAct(q, generator).attach() for q in acts if q.calibrated]
    try:
        for r in rounders:  # round-to-nearest on the initial grids: the baseline the optimization must beat
            r.soft = False
        facts = {"error_before": _sig(_error(sub, q_in, fp_out)), "iterations": settings.iterations}
        if settings.iterations and (rounders or (lsq and settings.learn_act_scale)):
            facts["loss_last"] = _optimize(sub, fp_in, q_in, fp_out, rounders, lsq, settings, generator, desc,
                                           progress)
    finally:
        for layer, r in zip(layers, rounders):
            layer.weight_quantizer = r.harden()
        for a in lsq:
            a.detach()
    return facts


def _optimize(sub, fp_in, q_in, fp_out, rounders, lsq, settings: ReconstructSettings, generator, desc, progress):
    s = settings
    for r in rounders:
        r.soft = True
        r.scale.requires_grad_(s.learn_weight_scale)
    for a in lsq:
        a.scale.requires_grad_(s.learn_act_scale)
        a.drop_p = s.qdrop_p
    opt_round = torch.optim.Adam([r.logits for r in rounders], lr=s.lr_round) if rounders else None
    groups = []
    if s.learn_weight_scale and rounders:
        groups.append({"params": [r.scale for r in rounders], "lr": s.lr_weight_scale})
    if s.learn_act_scale and lsq:
        groups.append({"params": [a.scale for a in lsq], "lr": s.lr_act_scale})
    opt_scale = torch.optim.Adam(groups) if groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_scale, T_max=s.iterations) if opt_scale else None
    n, bs = len(q_in), min(s.batch_size, len(q_in))
    decay_start = s.warmup * s.iterations
    perm, pos, recent = torch.randperm(n, generator=generator, device=q_in.device), 0, []
    steps = tqdm(range(1, s.iterations + 1), desc=desc, disable=not progress, leave=False)
    try:
        for it in steps:
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=generator, device=q_in.device), 0
            idx = perm[pos:pos + bs]
            pos += bs
            y = sub(qdrop_mix(q_in[idx], fp_in[idx], s.qdrop_p, generator))
            rec = output_error(y, fp_out[idx])
            loss = rec
            if rounders and it >= decay_start:
                progress_frac = (it - decay_start) / max(s.iterations - decay_start, 1)
                beta = s.beta_end + (s.beta_start - s.beta_end) * max(0.0, 1.0 - progress_frac)
                loss = loss + s.reg_weight * sum(r.regularizer(beta) for r in rounders)
            for opt in (opt_round, opt_scale):
                if opt:
                    opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in (opt_round, opt_scale):
                if opt:
                    opt.step()
            if sched:
                sched.step()
            recent.append(float(rec.detach()))
            recent = recent[-50:]
            if it % 100 == 0:
                steps.set_postfix(rec=f"{sum(recent) / len(recent):.4f}")
    finally:
        for r in rounders:
            r.soft = False
        for a in lsq:
            a.drop_p = 0.0
    return _sig(sum(recent) / max(len(recent), 1))
