"""Atomic training checkpoints and the random-number state they carry."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(path: Path, state: dict) -> None:
    """torch.save into a temporary file beside `path`, fsync, rename: a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=False)  # our own file: tensors, dicts, RNG tuples


def rng_state(sampler: torch.Generator) -> dict:
    state = {"sampler": sampler.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(sampler: torch.Generator, state: dict) -> None:
    sampler.set_state(state["sampler"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
