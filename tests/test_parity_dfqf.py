"""The DFQF parity driver (scripts/parity/dfqf.py) without its clone: its text rewrites on fake files holding the
lines it expects (not the clone's text), the lines it reads from the code's prints, the train-loader stand-in, and
the stand-ins for modules the code imports without using them on this path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
import dfqf  # noqa: E402
import third_party as tp  # noqa: E402

FAKE_DFKD = """accr_best = 0
saved = []
for epoch in range(3):
    for i in range(120):
        pass
    S_acc = [0.5, 0.4, 0.3][epoch]
    if S_acc > accr_best:
        saved.append((epoch, i))
        accr_best = S_acc
"""


def test_stage1_rewrites_run_the_schedules_iterations_and_keep_the_final_generator(tmp_path):
    script = tmp_path / "dfkd.py"
    script.write_text(FAKE_DFKD)
    g, notes, _ = tp.run_script(script, [], dfqf.STAGE1, {"iters": 7})
    # unpatched, only epoch 0 (the best) would be saved, after iteration 119
    assert g["saved"] == [(0, 6), (1, 6), (2, 6)]
    assert [n.split()[0] for n in notes] == ["D1", "D2"]
    with pytest.raises(tp.RewriteMismatch, match="rewrite D1"):
        tp.apply_rewrites(FAKE_DFKD.replace("range(120)", "range(200)"), dfqf.STAGE1, {"iters": 7})


def test_misc_rewrite_takes_a_fixed_terminal_width(tmp_path):
    misc = tmp_path / "misc.py"
    misc.write_text("import os\n_, term_width = os.popen('stty size', 'r').read().split()\n"
                    "term_width = int(term_width)\n")
    mod, notes, _ = tp.load_module(misc, "fake_dfqf_misc", dfqf.MISC)
    assert mod.term_width == 80 and notes[0].startswith("D3 misc.py")


def test_the_codes_prints_are_read_per_epoch():
    stage1 = ("[Epoch 0/2] [loss_is: -31.9] ...\nTest Avg. Loss: 41.555012, Accuracy: 0.100000\n"
              "Teacher Test. Loss: 0.392465, Accuracy: 0.852000\nTest Avg. Loss: nan, Accuracy: 0.250000\n")
    assert dfqf.STAGE1_LINE.findall(stage1) == ["0.100000", "0.250000"]  # the teacher's test is not an epoch
    stage2 = "\nEpoch: 0\nTest Loss: 0.6287 | Acc: 0.7800 | \n\nEpoch: 1\nTest Loss: 0.6460 | Acc: 0.7760 | \n"
    assert dfqf.EPOCH_LINE.findall(stage2) == ["0.7800", "0.7760"]


def test_train_loader_stand_in_gives_the_schedules_iterations():
    steps = dfqf._Steps(5)
    assert len(steps) == 5 and len(list(steps)) == 5 and len(list(steps)) == 5  # every epoch starts again
    imgs, labels = next(iter(steps))
    assert imgs.numel() == 0 and labels.numel() == 0


def test_stubs_only_replace_what_is_missing(monkeypatch):
    import importlib
    real = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name in ("seaborn", "scipy"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    for name in ("seaborn", "scipy", "scipy.stats", "scipy.optimize", "tensorboardX"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(importlib, "import_module", fake_import)
    patches: list[str] = []
    try:
        dfqf._install_stubs(patches)
        assert [p.split(" ->")[0] for p in patches] == ["import tensorboardX", "import seaborn", "import scipy",
                                                        "import scipy.optimize", "import scipy.stats"]
        from scipy import stats  # noqa: F401  (clip.py's import line works against the stand-in)
        from scipy.optimize import curve_fit
        assert curve_fit is None
    finally:  # the stand-ins must not outlive the test (monkeypatch restores only the names it removed)
        for name in ("seaborn", "scipy", "scipy.stats", "scipy.optimize", "tensorboardX"):
            sys.modules.pop(name, None)
