"""Top-1 / top-5 accuracy of a classifier on an EvalSet."""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import EvalSet
from .quant.quantizers.core import frozen_weights


def evaluate(model: nn.Module, data: EvalSet, batch_size: int, device: torch.device, progress: bool = False,
             desc: str = "eval") -> dict:
    model.eval().to(device)
    correct1 = correct5 = seen = 0
    t0 = time.perf_counter()
    total = (data.num_samples + batch_size - 1) // batch_size
    with frozen_weights(model), torch.inference_mode():  # each quantized weight computed once, not per batch
        for x, y in tqdm(data.batches(batch_size, device), total=total, desc=desc, disable=not progress,
                         leave=False):
            logits = model(x)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == y[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            seen += y.numel()
    seconds = time.perf_counter() - t0
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "n": seen,
            "seconds": seconds, "images_per_s": seen / seconds if seconds > 0 else float("nan")}
