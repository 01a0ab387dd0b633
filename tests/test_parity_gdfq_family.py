"""The GDFQ-family table (scripts/parity/gdfq_family.py). Without the clones: every entry's run-time rewrites,
stage-1 arguments and hocon keys fill in from the values the driver supplies, and the fixed-set layout of
IntraQ/HAST's stage 1 (equal groups of up to 5 batches of 256). With a clone (or mirror) of an entry's repository
here (skipped otherwise): every rewrite anchor is found the stated number of times in the function the driver
rewrites; AdaSG/AdaDFQ's main.py compiles only after its script rewrite; AdaDFQ's hocon values are the shipped
ones; the official AdaSG/AdaDFQ margin and student losses equal dfqbench's terms (value and gradient)."""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
import gdfq_family  # noqa: E402

# what scripts/parity/gdfq.py's child fills in (stage 2) and synthesize() (stage 1), none equal to the
# codes' own (4 calibration epochs, seed 1) so that every rewrite changes its text
VALUES = {"iters_per_epoch": 60, "calib_epochs": 3, "milestones": [8], "manual_seed": 3, "root": "/clone",
          "model": "resnet20_cifar10", "data_head": "/s/data_group", "label_head": "/s/label_group", "groups": 1,
          "warmup_batch": 64}
SYNTH_VALUES = {"synth_batches": 1, "fixed_set_iterations": 200}


@pytest.mark.parametrize("name", sorted(gdfq_family.FAMILY))
def test_entry_fills_in(name):
    entry = gdfq_family.FAMILY[name]
    assert entry.tested
    for rw in entry.rewrites:
        assert rw.why and rw.old != rw.new.format(**VALUES)
    for rw in entry.warmup_batch_rewrites:  # 16 -> the driver's --warmup-batch
        assert rw.why and "16" in rw.old and "64" in rw.new.format(**VALUES) and "16" not in rw.new
    assert bool(entry.warmup_batch_rewrites) == (name in ("intraq", "hast"))
    for rw in entry.script_rewrites:  # the script's text before it is compiled: no line may move
        assert rw.why and rw.old != rw.new and rw.old.count("\n") == rw.new.count("\n")
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


# --- the clones' own text (skipped where no clone is here) ---------------------------------------------------------
# A work tree at $DFQ_PARITY_CLONES/off-<owner>+<name> (default /tmp), else the mirror /work/.mirror/<owner>+<name>
# (its HEAD; DFQ_PARITY_MIRRORS moves it).

CLONES = Path(os.environ.get("DFQ_PARITY_CLONES", "/tmp"))
MIRRORS = Path(os.environ.get("DFQ_PARITY_MIRRORS", "/work/.mirror"))


def clone_reader(repo: str):
    """read(relative path) -> the clone's text (universal newlines, as Python imports it) or None; None if no
    clone or mirror of `repo` is here."""
    tree = CLONES / f"off-{repo.replace('/', '+')}"
    git_dir = MIRRORS / repo.replace("/", "+") / "repo"
    if tree.is_dir():
        def read(rel):
            path = tree / rel
            return path.read_text() if path.is_file() else None
        return read
    if git_dir.is_dir():
        def read(rel):
            out = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{rel}"], capture_output=True)
            if out.returncode:
                return None
            return out.stdout.decode().replace("\r\n", "\n").replace("\r", "\n")
        return read
    return None


def function_source(text: str, owner_cls: str, attr: str) -> str | None:
    """The dedented source of `Class.attr` (owner_cls "") or of the module-level `attr`, as inspect.getsource
    gives it to the driver's rewrite_function."""
    tree = ast.parse(text)
    body = tree.body
    if owner_cls:
        cls = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == owner_cls), None)
        body = cls.body if cls else []
    node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == attr), None)
    if node is None:
        return None
    return textwrap.dedent("\n".join(text.splitlines()[node.lineno - 1:node.end_lineno]) + "\n")


def check_rewrites(read, base: str, rewrites, values: dict, script: str = "", script_rewrites=()) -> int:
    """Apply `rewrites` to the clone's text as apply_source_rewrites/rewrite_function do (grouped by function, in
    order, each `old` found `count` times); returns how many were checked."""
    texts = {}

    def module_text(mod: str) -> str:
        if mod not in texts:
            rel = mod.replace(".", "/") + ".py"
            text = read(f"{base}/{rel}" if base else rel)
            assert text is not None, f"{rel} not in the clone under {base!r}"
            if rel == script:
                for rw in script_rewrites:
                    assert text.count(rw.old) == rw.count, rw.old
                    lines = text.count("\n")
                    text = text.replace(rw.old, rw.new)
                    assert text.count("\n") == lines
            texts[mod] = text
        return texts[mod]

    grouped: dict[tuple[str, str], list] = {}
    for rw in rewrites:
        grouped.setdefault((rw.owner, rw.attr), []).append(rw)
    for (owner, attr), rws in grouped.items():
        mod, _, cls = owner.partition(":")
        src = function_source(module_text(mod), cls, attr)
        assert src is not None, f"{owner}.{attr} not in the clone"
        assert "super()" not in src
        for rw in rws:
            assert src.count(rw.old) == rw.count, f"{owner}.{attr}: {rw.old!r} found {src.count(rw.old)} times"
            src = src.replace(rw.old, rw.new.format(**values))
        compile(src, f"{owner}.{attr}", "exec")  # the rewritten function still compiles
    return sum(len(r) for r in grouped.values())


@pytest.mark.parametrize("name", sorted(gdfq_family.FAMILY))
def test_rewrite_anchors_found_in_the_clone(name):
    entry = gdfq_family.FAMILY[name]
    read = clone_reader(entry.repo)
    if read is None:
        pytest.skip(f"no clone of {entry.repo} here ({CLONES}/off-*, {MIRRORS})")
    # the driver's --warmup-batch rewrites go in the same call as the entry's (one recompile per function)
    rewrites = entry.rewrites + entry.warmup_batch_rewrites
    checked = check_rewrites(read, entry.subdir, rewrites, VALUES, script=entry.main,
                             script_rewrites=entry.script_rewrites)
    if entry.synth:
        base = str(Path(entry.subdir or ".", entry.synth.script).parent)
        checked += check_rewrites(read, base, entry.synth.rewrites, SYNTH_VALUES)
    assert checked == len(rewrites) + (len(entry.synth.rewrites) if entry.synth else 0)


@pytest.mark.parametrize("name", ["adasg", "adadfq"])
def test_ada_main_does_not_compile_as_shipped(name):
    """hfutqian's CIFAR main.py: the ImageNet branch's `if` has no indented body; the script rewrite mends it."""
    entry = gdfq_family.FAMILY[name]
    read = clone_reader(entry.repo)
    if read is None:
        pytest.skip(f"no clone of {entry.repo} here")
    text = read(f"{entry.subdir}/{entry.main}")
    with pytest.raises(IndentationError):
        compile(text, entry.main, "exec")
    for rw in entry.script_rewrites:
        text = text.replace(rw.old, rw.new)
    compile(text, entry.main, "exec")


def test_ada_hocon_keys_kept_as_shipped():
    """AdaDFQ's options.py reads the hocon's margin bounds and weights (the shipped file does not); the driver
    appends none of them, so the CIFAR-10 hocon's values are used."""
    rw = next(r for r in gdfq_family.FAMILY["adadfq"].rewrites if r.owner == "options:Option")
    keys = ("network", "alpha_ds", "alpha_as", "lambda_l", "lambda_u", "beta", "gamma")
    assert all(f"self.{k} = self.conf['{k}']" in rw.new for k in keys)
    rw = next(r for r in gdfq_family.FAMILY["adasg"].rewrites if r.owner == "options:Option")
    assert "self.network = self.conf['network']" in rw.new and "alpha_ds" not in rw.new
    read = clone_reader("hfutqian/AdaDFQ")
    if read is None:
        pytest.skip("no clone of hfutqian/AdaDFQ here")
    text = read("AdaDFQ/CIFAR/cifar10_resnet20.hocon")
    shipped = {k: float(re.search(rf"^{k}\s*=\s*([0-9.]+)", text, re.M).group(1)) for k in keys[1:]}
    assert shipped == {"alpha_ds": 0.2, "alpha_as": 0.1, "lambda_l": 0.1, "lambda_u": 0.8, "beta": 1.0, "gamma": 1.0}
    assert "self.alpha_ds" not in read("AdaDFQ/CIFAR/options.py")  # the shipped options.py does not read them


def _official_losses(name: str, monkeypatch):
    """marginal_loss (with the entry's rewrite) and Trainer.loss_fn_kd compiled from the clone's trainer.py."""
    import torch
    entry = gdfq_family.FAMILY[name]
    read = clone_reader(entry.repo)
    if read is None:
        pytest.skip(f"no clone of {entry.repo} here")
    text = read(f"{entry.subdir}/trainer.py")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # as the driver does without a GPU
    import torch.nn.functional as F
    ns = {"torch": torch, "F": F, "math": math}
    rw = next(r for r in entry.rewrites if r.attr == "marginal_loss")
    exec(function_source(text, "", "compute_entropy"), ns)
    shipped = dict(ns)
    exec(function_source(text, "", "marginal_loss"), shipped)
    exec(function_source(text, "", "marginal_loss").replace(rw.old, rw.new), ns)
    exec(function_source(text, "Trainer", "loss_fn_kd"), ns)
    return ns["marginal_loss"], shipped["marginal_loss"], ns["loss_fn_kd"]


@pytest.mark.parametrize("name,bounds", [("adasg", ()), ("adadfq", (0.8, 0.1))])
def test_ada_official_losses_match_dfqbench(name, bounds, monkeypatch):
    """The official margin (rewritten to the batch's size) and student loss beside dfqbench's terms: a
    hand-checked value (C = 2: one sample at entropy log 2, one at 0 -> h' = [1, 0] -> (0 + lower) / 2 +
    (1 - 0.8 + 0) / 2), equal values and gradients at batch 64, and at batch 16 the rewrite changes nothing."""
    import torch
    from dfqbench.train.losses import AdaptabilityMargin, DifferenceEntropy, Step
    margin, shipped, loss_fn_kd = _official_losses(name, monkeypatch)
    lower = 0.3 if name == "adasg" else 0.1
    ours = AdaptabilityMargin(lower=lower, upper=0.8)
    t = torch.tensor([[0.0, 0.0], [1000.0, 0.0]])
    s = torch.zeros(2, 2)
    assert float(margin(t, s, 2, *bounds)) == pytest.approx((lower + 0.2) / 2, abs=1e-7)
    assert float(ours(Step(s, None, teacher_logits=t, student=lambda x: x))) == pytest.approx((lower + 0.2) / 2,
                                                                                               abs=1e-7)
    g = torch.Generator().manual_seed(0)
    for batch in (64, 16):
        t = torch.randn(batch, 10, generator=g) * 3
        s0 = torch.randn(batch, 10, generator=g) * 3
        s1, s2 = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        official = margin(t, s1, 10, *bounds)
        mine = ours(Step(s2, None, teacher_logits=t, student=lambda x: x))
        official.backward()
        mine.backward()
        assert float(official.detach()) == pytest.approx(float(mine.detach()), rel=1e-6)
        assert torch.allclose(s1.grad, s2.grad, atol=1e-7)
        if batch == 16:  # the shipped zeros(16) at its own batch: the same value
            assert float(shipped(t, s0, 10, *bounds)) == pytest.approx(float(official.detach()), rel=1e-7)
        else:
            with pytest.raises(RuntimeError):
                shipped(t, s0, 10, *bounds)
        kd = loss_fn_kd(None, s0, None, t)
        de = DifferenceEntropy(temperature=20)(Step(s0, None, teacher_logits=t, student=lambda x: x))
        assert float(kd) == pytest.approx(float(de), rel=1e-6)
