"""Slow: the foundation's W8A8 promise on the full 10,000-image test set (python -m pytest -m slow)."""

import pytest

from conftest import compose_cfg
from dfqbench.runner import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quant", ["gdfq", "brecq"])
@pytest.mark.parametrize("method", ["rtn", "dfq", "zeroq"])
def test_w8a8_within_half_a_point_of_fp32(tmp_path, cache_dir, cifar10_root, teacher, method, quant):
    record = run(compose_cfg(f"model.checkpoint={teacher}", f"dataset.root={cifar10_root}",
                             f"paths.cache_dir={cache_dir}", f"method={method}", f"quant={quant}", "wbit=8", "abit=8"),
                 tmp_path)
    assert record["n_test"] == 10000
    assert record["fp32_top1"] == pytest.approx(87.66, abs=0.01)
    assert abs(record["fp32_top1"] - record["top1"]) <= 0.5
