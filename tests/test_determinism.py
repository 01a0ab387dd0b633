"""A method that says it is deterministic (`Method.stochastic` False) must give the same quantized network under
every seed: the sweeps run it at seed 0 only (dfqbench.sweep) and the tables show that one run for every seed."""

import copy
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_cfg
from dfqbench.methods.base import QuantContext
from dfqbench.models import load_model
from dfqbench.quant.kernels.backend import resolve_backend_name, use_backend
from dfqbench.runner import _seed_everything, build_convention, build_method

DETERMINISTIC = ("aciq", "dfq", "fp32", "ocs", "pnmq", "powerquant", "rex", "rtn", "spiq", "squant")


def test_the_deterministic_methods_are_exactly_these():
    found = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml")
                   if not build_method(compose_cfg(f"method={p.stem}")).stochastic)
    assert found == sorted(DETERMINISTIC)


def _quantized_logits(method_name: str, seed: int, x: torch.Tensor, cache: Path) -> torch.Tensor:
    cfg = compose_cfg(f"method={method_name}", f"seed={seed}", "wbit=4", "abit=4")
    method = build_method(cfg)
    convention = build_convention(cfg, method)
    _seed_everything(seed)  # as the runner does: a method reading the global generators would differ
    model = load_model(cfg.model, cfg.paths.models_dir).model.eval()
    ctx = QuantContext(convention, 4, 4, seed, torch.device("cpu"), (3, 32, 32), 10, progress=False,
                       mean=torch.tensor(list(cfg.dataset.mean)), std=torch.tensor(list(cfg.dataset.std)),
                       cache_dir=str(cache))
    with use_backend(resolve_backend_name(convention.backend, torch.device("cpu"))), torch.inference_mode():
        qmodel = method.quantize(copy.deepcopy(model), ctx).eval()
        return qmodel(x), model(x)


@pytest.mark.parametrize("method_name", DETERMINISTIC)
def test_a_deterministic_method_gives_the_same_network_under_another_seed(method_name, teacher, tmp_path,
                                                                          one_thread):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q0, fp = _quantized_logits(method_name, 0, x, tmp_path)
    q1, _ = _quantized_logits(method_name, 1, x, tmp_path)
    assert torch.equal(q0, q1)
    if method_name != "fp32":  # the comparison is between quantized networks, not two copies of the teacher
        assert not torch.allclose(q0, fp, atol=1e-3)
