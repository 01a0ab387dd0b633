"""The GDFQ-family table (scripts/parity/gdfq_family.py) without the clones: every entry's run-time rewrites,
stage-1 arguments and hocon keys fill in from the values the driver supplies, and the fixed-set layout of
IntraQ/HAST's stage 1 (equal groups of up to 5 batches of 256)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
import gdfq_family  # noqa: E402

# what scripts/parity/gdfq.py's child fills in (stage 2) and synthesize() (stage 1), none equal to the
# codes' own (4 calibration epochs, seed 1) so that every rewrite changes its text
VALUES = {"iters_per_epoch": 60, "calib_epochs": 3, "milestones": [8], "manual_seed": 3, "root": "/clone",
          "model": "resnet20_cifar10", "data_head": "/s/data_group", "label_head": "/s/label_group", "groups": 1}
SYNTH_VALUES = {"synth_batches": 1, "fixed_set_iterations": 200}


@pytest.mark.parametrize("name", sorted(gdfq_family.FAMILY))
def test_entry_fills_in(name):
    entry = gdfq_family.FAMILY[name]
    assert entry.tested
    for rw in entry.rewrites:
        assert rw.why and rw.old != rw.new.format(**VALUES)
    for key, value in entry.hocon_extra:
        assert "{" not in value.format(**VALUES)
    if entry.synth:
        for rw in entry.synth.rewrites:
            assert rw.why
            rw.new.format(**SYNTH_VALUES)
        argv = [x.format(model="resnet20_cifar10", batch=256, group=1, out="/s") for x in entry.synth.argv]
        assert "--group=1" in argv and "--batch_size=256" in argv
    else:
        assert not entry.hocon_extra


def test_fixed_set_layout():
    assert gdfq_family.synth_layout(256) == (256, 1, 1)        # the cpu schedule
    assert gdfq_family.synth_layout(5120) == (256, 5, 4)       # the codes' own set
    assert gdfq_family.synth_layout(512) == (256, 2, 1)
    assert gdfq_family.synth_layout(64) == (64, 1, 1)
    for images in (1536, 300):                                 # 6 batches; not whole batches
        with pytest.raises(SystemExit):
            gdfq_family.synth_layout(images)
