"""The ZAQ parity driver (scripts/parity/zaq.py) without running training: its arguments, the budget it hands the
official main.py (computed here by hand from conf/schedule/cpu.yaml and conf/method/zaq.yaml), the teacher's
weights under the code's ResNet20 names, the main.py text rewrites (on a fake text; on the clone's text when a
clone is there), the visdom stand-in, and the parent's records and results/parity.csv row with the child and
the dfqbench runs faked.

The clone: $DFQ_PARITY_ZAQ_CLONE, default /tmp/off-FLHonker+ZAQ-code (`git clone
/work/.mirror/FLHonker+ZAQ-code/repo /tmp/off-FLHonker+ZAQ-code`); the tests that read it are skipped without it."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
import common  # noqa: E402
import third_party as tp  # noqa: E402
import zaq  # noqa: E402
from dfqbench.records import code_digest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLONE = Path(os.environ.get("DFQ_PARITY_ZAQ_CLONE", "/tmp/off-FLHonker+ZAQ-code"))
needs_clone = pytest.mark.skipif(not (CLONE / "main.py").is_file(),
                                 reason=f"no ZAQ-code clone at {CLONE} (set DFQ_PARITY_ZAQ_CLONE)")


def _parse(argv):
    p = argparse.ArgumentParser()
    zaq.add_arguments(p)
    return p.parse_args(argv)


# --- arguments and cells ------------------------------------------------------------------------------------------

def test_arguments_default_to_the_cpu_cell_of_three_seeds_at_w4a4_with_the_codes_alpha(tmp_path):
    a = _parse(["--official", "clone"])
    assert (a.schedule, a.seeds, a.wbit, a.abit, a.quant, a.threads) == ("cpu", [0, 1, 2], 4, 4, "gdfq", 1)
    assert a.alpha is None and zaq.alpha_of(a) == 1.0 and not a.dfqbench and not a.resume and not a.cpu
    assert zaq.cell_of(a) == (common.REPO / "results" / "parity" / "zaq" / "w4a4-cpu", "")
    a = _parse(["--official", "c", "--out", str(tmp_path), "--alpha", "0", "--seeds", "3", "--max-samples", "300",
                "--schedule-override", "epochs=2", "iters_per_epoch=3", "--resume", "--dfqbench", "--cpu"])
    assert a.seeds == [3] and a.max_samples == 300 and a.schedule_override == ["epochs=2", "iters_per_epoch=3"]
    assert zaq.cell_of(a) == (tmp_path / "alpha0" / "w4a4-cpu", "alpha0")
    assert zaq.cell_of(_parse(["--official", "c", "--out", str(tmp_path), "--alpha", "1"]))[1] == ""
    assert zaq.cell_of(_parse(["--official", "c", "--out", str(tmp_path), "--tag", "x", "--alpha", "0"]))[1] == "x"
    a = _parse(["--official", "c", "--out", str(tmp_path), "--alpha", "0", "--relu-per-use"])
    assert zaq.cell_of(a) == (tmp_path / "alpha0-relu_per_use" / "w4a4-cpu", "alpha0-relu_per_use")
    assert "--relu-per-use" in zaq.child_args(a, 0, tmp_path) and not a.tag
    a = _parse(["--official", "c", "--out", str(tmp_path), "--relu-per-use", "--frozen-test-ranges"])
    assert zaq.cell_of(a)[1] == "relu_per_use-frozen_test_ranges"
    assert "--frozen-test-ranges" in zaq.child_args(a, 0, tmp_path)
    with pytest.raises(SystemExit):
        _parse([])  # --official is required


def test_child_arguments_carry_the_cell():
    a = _parse(["--official", "/c", "--alpha", "0.5", "--max-samples", "100", "--schedule-override", "epochs=2",
                "--method-overrides", "method.x=1", "--cpu"])
    args = zaq.child_args(a, 7, Path("/tmp/s"))
    assert args[args.index("--seed") + 1] == "7" and args[args.index("--alpha") + 1] == "0.5"
    assert args[args.index("--scratch") + 1] == "/tmp/s" and "--cpu" in args
    assert args[args.index("--schedule-override") + 1] == "epochs=2"
    assert args[args.index("--method-overrides") + 1] == "method.x=1"
    child = _parse([*args, "--child"])
    assert child.child and child.seed == 7 and child.alpha == 0.5 and child.official == "/c"


# --- the budget ---------------------------------------------------------------------------------------------------

def test_cpu_budget_is_the_schedule_with_zaqs_overrides_and_maps_onto_mains_arguments():
    a = _parse(["--official", "c"])
    sched = tp.effective_schedule(tp.method_config(tp.method_overrides_list(a, "zaq")))
    # by hand: conf/schedule/cpu.yaml 10 x 60, batch 64, milestones [8]; zaq.yaml: warm-up 0, calib = epochs
    assert (sched["epochs"], sched["iters_per_epoch"], sched["batch_size"]) == (10, 60, 64)
    assert (sched["warmup_epochs"], sched["calib_epochs"], sched["milestones"]) == (0, 10, [8])
    zaq.check_schedule(sched)
    a.seed = 2
    assert zaq.official_argv(a, sched, "cifar10", "/d", "/t.pt") == [
        "--model", "resnet20", "--dataset", "cifar10", "--data_root", "/d", "--ckpt", "/t.pt", "--epochs", "10",
        "--epoch_itrs", "60", "--batch_size", "64", "--weight_bit", "4", "--activation_bit", "4", "--seed", "2"]
    a.alpha = 0.0
    assert zaq.official_argv(a, sched, "cifar10", "/d", "/t.pt")[-2:] == ["--alpha", "0.0"]
    with pytest.raises(SystemExit, match="knows"):
        zaq.official_argv(a, sched, "imagenet", "/d", "/t.pt")
    # 600 iterations = 3,000 student steps and 600 generator steps, as dfqbench's 600 x (1 + 5)
    assert sched["epochs"] * sched["iters_per_epoch"] * zaq.STUDENT_STEPS == 3000


def test_a_schedule_override_reaches_the_budget_and_a_warmup_or_frozen_ranges_are_refused():
    a = _parse(["--official", "c", "--schedule-override", "epochs=2", "iters_per_epoch=3", "milestones=[1]"])
    sched = tp.effective_schedule(tp.method_config(tp.method_overrides_list(a, "zaq")))
    assert (sched["epochs"], sched["iters_per_epoch"], sched["calib_epochs"], sched["milestones"]) == (2, 3, 2, [1])
    zaq.check_schedule(sched)
    for bad in ({"warmup_epochs": 1}, {"calib_epochs": 1}):
        with pytest.raises(SystemExit, match="no warm-up"):
            zaq.check_schedule({**sched, **bad})


# --- the main.py rewrites -----------------------------------------------------------------------------------------

FAKE_MAIN = """args = parse()
scheduler_Q = optim.lr_scheduler.MultiStepLR(optimizer_Q, [100, 200], args.gamma)
scheduler_G = optim.lr_scheduler.MultiStepLR(optimizer_G, [100, 200], args.gamma)
name = 'log/ZAQ-%s-%s-%sbit.csv'%(args.dataset, args.model, args.param_bits)
"""


def test_rewrites_set_the_milestones_on_both_schedulers_and_the_log_name():
    out, notes = tp.apply_rewrites(FAKE_MAIN, zaq.REWRITES, {"milestones": [8]}, where="main.py")
    assert out.count("MultiStepLR(optimizer_Q, [8], args.gamma)") == 1
    assert out.count("MultiStepLR(optimizer_G, [8], args.gamma)") == 1
    assert "args.param_bits" not in out and "args.model, args.weight_bit)" in out
    assert [n.split()[0] for n in notes] == ["Z4", "Z5"] and out.count("\n") == FAKE_MAIN.count("\n")
    assert "[]" in tp.apply_rewrites(FAKE_MAIN, zaq.REWRITES, {"milestones": []})[0]
    with pytest.raises(tp.RewriteMismatch, match="Z4"):  # one scheduler only: not the clone's text
        tp.apply_rewrites(FAKE_MAIN.replace("[100, 200], args.gamma)\nscheduler_G", "[1], args.gamma)\nscheduler_G"),
                          zaq.REWRITES, {"milestones": [8]})


@needs_clone
def test_every_rewrite_anchor_is_in_the_clones_main_py_as_often_as_stated():
    text = (CLONE / "main.py").read_text()
    for rw in zaq.REWRITES:
        assert text.count(rw.old) == rw.count, rw.key
    out, notes = tp.apply_rewrites(text, zaq.REWRITES, {"milestones": [8]}, where="main.py")
    assert len(notes) == 2 and "[100, 200]" not in out and "param_bits" not in out
    compile(out, "main.py", "exec")
    for f in zaq.CODE_FILES:
        assert (CLONE / f).is_file(), f
    assert (CLONE / zaq.MARKER).is_file()
    if (CLONE / ".git").exists():
        assert tp.same_code_as(CLONE, zaq.EXPECTED_COMMIT, zaq.CODE_FILES) is True


# --- the teacher under the code's names ---------------------------------------------------------------------------

def _pytorchcv_resnet20():
    from pytorchcv.model_provider import get_model
    torch.manual_seed(0)
    net = get_model("resnet20_cifar10", pretrained=False).eval()
    with torch.no_grad():  # BN statistics other than the initial ones, so that a swapped buffer shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


def test_teacher_keys_map_onto_the_codes_resnet20_names():
    state = _pytorchcv_resnet20().state_dict()
    mapped = zaq.official_state_dict(state)
    assert len(mapped) == len(state) == 128
    assert zaq.official_key("features.init_block.conv.weight") == "conv1.weight"
    assert zaq.official_key("features.init_block.bn.running_var") == "bn1.running_var"
    assert zaq.official_key("features.stage1.unit1.body.conv1.conv.weight") == "layer1.0.conv1.weight"
    assert zaq.official_key("features.stage2.unit3.body.conv2.bn.weight") == "layer2.2.bn2.weight"
    assert zaq.official_key("features.stage3.unit1.identity_conv.conv.weight") == "layer3.0.shortcut.0.weight"
    assert zaq.official_key("features.stage3.unit1.identity_conv.bn.num_batches_tracked") == \
        "layer3.0.shortcut.1.num_batches_tracked"
    assert zaq.official_key("output.bias") == "linear.bias"
    assert torch.equal(mapped["layer2.0.shortcut.1.running_mean"],
                       state["features.stage2.unit1.identity_conv.bn.running_mean"])
    for bad in ("features.final_pool.weight", "features.stage1.unit1.body.conv3.conv.weight"):
        with pytest.raises(SystemExit, match="no place"):
            zaq.official_key(bad)


@needs_clone
def test_the_codes_resnet20_with_the_mapped_weights_is_the_teacher_and_quantizes_as_the_code_does(monkeypatch):
    """The child's imports (the stand-ins for visdom, pydot and graphviz), network/resnet20.py strict-loading the
    mapped state_dict with the same logits, and the code's quantize_model on it: 21 convs + 1 linear quantized,
    one QuantAct per block (its shared ReLU) + the stem's = 10."""
    teacher = _pytorchcv_resnet20()
    for name in zaq.CLONE_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    patches = []
    for name in ("visdom", "pydot", "graphviz"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    tp.stub_module("visdom", patches, "test", Visdom=zaq.RecordingVisdom)
    tp.stub_module("graphviz", patches, "test", Digraph=zaq._unused("graphviz.Digraph"))
    monkeypatch.syspath_prepend(str(CLONE))
    try:
        import network
        import quantization
        net = network.resnet20.ResNet20(num_classes=10)
        net.load_state_dict(zaq.official_state_dict(teacher.state_dict()))  # strict
        x = torch.randn(8, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), teacher(x), rtol=0, atol=1e-5)
            feats, logits = net(x, True)
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
        q = quantization.quantize_model(net, types.SimpleNamespace(weight_bit=4, activation_bit=4))
        kinds = [type(m).__name__ for m in q.modules()]
        assert (kinds.count("Quant_Conv2d"), kinds.count("Quant_Linear"), kinds.count("QuantAct")) == (21, 1, 10)
        # Z8 (--relu-per-use): the same network and logits, one QuantAct per ReLU use (9 blocks x 2 + the stem's)
        code, notes, _ = tp.compile_rewritten(CLONE / "network" / "resnet20.py", zaq.RELU_PER_USE)
        exec(code, network.resnet20.__dict__)
        assert len(notes) == 2
        net = network.get_model(types.SimpleNamespace(model="resnet20", num_classes=10))
        net.load_state_dict(zaq.official_state_dict(teacher.state_dict()))
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), teacher(x), rtol=0, atol=1e-5)
        q = quantization.quantize_model(net, types.SimpleNamespace(weight_bit=4, activation_bit=4))
        assert [type(m).__name__ for m in q.modules()].count("QuantAct") == 19
        with pytest.raises(RuntimeError, match="stand-in"):
            sys.modules["graphviz"].Digraph()
    finally:
        tp.purge_modules(zaq.CLONE_MODULES)


@needs_clone
def test_z9_freezes_the_codes_ranges_during_a_test_only(monkeypatch):
    """Z9: the code's own freeze_model / unfreeze_model around main.test: a test batch far outside the range
    leaves x_max where the training batches put it, and the QuantAct tracks again afterwards."""
    for name in zaq.CLONE_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("pydot", "graphviz"):  # imported by the package, as in the child (Z1)
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["graphviz"].Digraph = zaq._unused("graphviz.Digraph")
    monkeypatch.syspath_prepend(str(CLONE))
    try:
        from quantization.quant_utils.quant_modules import QuantAct
        q = torch.nn.Sequential(torch.nn.ReLU(), QuantAct(activation_bit=4))
        q(torch.full((2, 3), 2.0))  # a "training" batch: range [0, 2]
        main_mod = types.SimpleNamespace(test=lambda args, model, loader, epoch=0: float(model(loader).max()))
        patches = []
        zaq.freeze_ranges_at_test(main_mod, patches)
        assert main_mod.test(None, q, torch.full((2, 3), 50.0), 1) == pytest.approx(2.0)  # clipped at the range
        assert float(q[1].x_max) == 2.0 and q[1].running_stat and patches[0].startswith("Z9")
        q(torch.full((2, 3), 5.0))
        assert float(q[1].x_max) == 5.0
    finally:
        tp.purge_modules(zaq.CLONE_MODULES)


def test_visdom_stand_in_keeps_the_line_values():
    zaq.RecordingVisdom.lines = {}
    v = zaq.RecordingVisdom(port="8097", env="ZAQ-main")
    v.line(X=[1], Y=[0.5], opts={}, win="Acc", env="e", update="append", name=None)
    v.line(X=[0], Y=[float("nan")], win="Loss_Q")
    v.image(img=None, win="x")  # other calls: no-ops
    assert zaq.RecordingVisdom.lines["Acc"] == [[1.0, 0.5]] and len(zaq.RecordingVisdom.lines["Loss_Q"]) == 1


# --- the parent: records and the parity.csv row --------------------------------------------------------------------

def test_parent_writes_records_and_the_row_and_resumes(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    for f in zaq.CODE_FILES:
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        (clone / f).write_text(f"# {f}\n")
    monkeypatch.setattr(common, "clone_identity", lambda path, repo, marker: (repo, "c" * 40))
    children = []

    def fake_child(script, args, log, env=None, append=False):
        child = _parse([*args, "--child"])
        children.append(child.seed)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("$ child\n")
        sched = tp.effective_schedule(tp.method_config(tp.method_overrides_list(child, "zaq")))
        return {**zaq.expected_settings(child, "c" * 40, sched), "top1": 10.0 + child.seed,
                "official_best_top1": 20.0 + child.seed, "official_best_epoch": 1,
                "quant_top1_before_training": 80.0, "train_s": 10.0, "wall_s": 11.0, "s_per_iteration": 1.0,
                "n_test": 100, "device": "cpu", "model": "resnet20_cifar10", "dataset": "cifar10"}

    def fake_dfqbench(overrides, dest, log, allow_diverged=False, in_sweeps=False):
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        assert "method=zaq" in overrides and "schedule.epochs=2" in overrides
        r = {"status": "done", "seed": seed, "wbit": 4, "abit": 4, "top1": 30.0 + seed, "quantize_time_s": 9.0,
             "fingerprint": {"code": code_digest()},
             "info": {"training": {"epochs": 2, "iters_per_epoch": 1, "batch_size": 16, "train_time_s": 8.0}}}
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.with_name(dest.name + ".record.json").write_text(json.dumps(r))
        return r

    monkeypatch.setattr(common, "run_child", fake_child)
    monkeypatch.setattr(common, "run_dfqbench", fake_dfqbench)
    argv = ["--official", str(clone), "--seeds", "0", "1", "--schedule-override", "epochs=2", "iters_per_epoch=1",
            "batch_size=16", "--max-samples", "100", "--out", str(tmp_path / "out"), "--csv",
            str(tmp_path / "parity.csv"), "--dfqbench"]
    zaq.main(argv)
    cell = tmp_path / "out" / "w4a4-cpu"
    assert children == [0, 1]
    official = json.loads((cell / "official.json").read_text())
    assert official["top1_mean"] == 10.5 and official["official_best_top1_mean"] == 20.5
    assert official["top1_is"] == "final epoch" and official["alpha"] == 1.0 and official["deviations"]
    assert json.loads((cell / "official-s1.json").read_text())["official_commit"] == "c" * 40
    rows = list(csv.DictReader(open(tmp_path / "parity.csv")))
    assert len(rows) == 1 and rows[0]["method"] == "zaq" and rows[0]["official_top1_mean"] == "10.50"
    assert rows[0]["dfqbench_top1_mean"] == "30.50" and rows[0]["official_repo"] == zaq.REPO
    assert "SCRM alpha 1" in rows[0]["note"] and "best epoch on test: 20.50" in rows[0]["note"]
    # --resume keeps both sides' finished seeds; another alpha is its own cell and row
    children.clear()
    zaq.main(argv + ["--resume"])
    assert children == []
    zaq.main(argv + ["--alpha", "0"])
    assert children == [0, 1] and (tmp_path / "out" / "alpha0" / "w4a4-cpu" / "official.json").exists()
    rows = list(csv.DictReader(open(tmp_path / "parity.csv")))
    assert [r["method"] for r in rows] == ["zaq", "zaq-alpha0"]
    assert "measured on the code itself" not in rows[1]["note"]
    # the Z8 ablation is its own cell and row, and the plain cell's row then quotes it as a measured cause
    children.clear()
    zaq.main(argv + ["--alpha", "0", "--relu-per-use"])
    assert children == [0, 1]
    zaq.main(argv + ["--alpha", "0", "--resume"])
    assert children == [0, 1]
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "parity.csv"))}
    assert list(rows) == ["zaq", "zaq-alpha0", "zaq-alpha0-relu_per_use"]
    assert "Z8 --relu-per-use" in rows["zaq-alpha0-relu_per_use"]["note"]
    assert "one QuantAct per ReLU use (Z8, dfqbench's placement) instead of one per block: 10.50 +- 0.71 over " \
           "seeds 0 1, 80.00 before training" in rows["zaq-alpha0"]["note"]
    zaq.main(argv + ["--alpha", "0", "--relu-per-use", "--frozen-test-ranges", "--official-seeds", "1"])
    zaq.main(argv + ["--alpha", "0", "--resume"])
    note = {r["method"]: r for r in csv.DictReader(open(tmp_path / "parity.csv"))}["zaq-alpha0"]["note"]
    assert note.count("before training (") == 2 and "Z8, dfqbench's placement) instead of one per block and ranges " \
        "frozen during the tests (Z9, as dfqbench: grown on generated batches only): 11.00 +- 0.00 over seeds 1" in note
    # a child that ran other settings is refused
    monkeypatch.setattr(common, "run_child", lambda *args, **kwargs: {**fake_child(*args, **kwargs), "wbit": 8})
    with pytest.raises(SystemExit, match="other settings"):
        zaq.main(argv)


# --- resuming inside a seed ---------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _fake_main(run: zaq.EpochResume, epochs: int, stop_at: int | None = None):
    """main.py's loop on a tiny student and generator: the same calls (train with keywords, both MultiStepLR
    schedulers step, test), the same kinds of state (SGD momentum, Adam moments, a running-range buffer grown by
    the test, torch.randn draws)."""
    torch.manual_seed(0)
    q = torch.nn.Linear(4, 2)
    q.register_buffer("x_max", torch.zeros(1))
    gen = torch.nn.Linear(3, 4)
    opt_q = torch.optim.SGD(q.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-2)
    sched = [torch.optim.lr_scheduler.MultiStepLR(o, [2], 0.1) for o in (opt_q, opt_g)]

    def train(args, p_model, q_model, generator, optimizer, epoch):
        if epoch == stop_at:
            raise _Stop
        for _ in range(3):
            oq, og = optimizer
            oq.zero_grad()
            q_model(generator(torch.randn(5, 3)).detach()).pow(2).mean().backward()
            oq.step()
            og.zero_grad()
            (-q_model(generator(torch.randn(5, 3))).pow(2).mean()).backward()
            og.step()
        zaq.RecordingVisdom().line(X=[epoch], Y=[float(epoch)], win="Loss_Q")

    def test(args, model, loader, epoch=0):
        x = loader + epoch
        with torch.no_grad():
            model.x_max.copy_(torch.maximum(model.x_max, x.abs().max()))
            return float(model(x).sum() + model.x_max)

    train, test = run.wrap_train(train), run.wrap_test(test)
    accs = [test(None, q, torch.ones(1, 4))]
    for epoch in range(1, epochs + 1):
        train(None, p_model=None, q_model=q, generator=gen, optimizer=[opt_q, opt_g], epoch=epoch)
        for s in sched:
            s.step()
        accs.append(test(None, q, torch.ones(1, 4), epoch))
        zaq.RecordingVisdom().line(X=[epoch], Y=[accs[-1]], win="Acc")
    return q, gen, opt_q, accs


def test_a_stopped_and_resumed_official_seed_ends_where_an_uninterrupted_one_does(tmp_path):
    settings = {"argv": ["--seed", "0"]}
    zaq.RecordingVisdom.lines = {}
    q0, g0, o0, accs0 = _fake_main(zaq.EpochResume(None, settings, resume=False), 3)
    lines0 = zaq.RecordingVisdom.lines
    path = tmp_path / "official-s0.resume.pt"
    zaq.RecordingVisdom.lines = {}
    with pytest.raises(_Stop):  # killed during epoch 3: epochs 1 and 2 are kept
        _fake_main(zaq.EpochResume(path, settings, resume=True), 3, stop_at=3)
    assert torch.load(path, weights_only=False)["epoch"] == 2
    zaq.RecordingVisdom.lines = {}
    run = zaq.EpochResume(path, settings, resume=True)
    q1, g1, o1, accs1 = _fake_main(run, 3)
    assert run.resumed_from_epoch == 2 and len(run.train_s) == 3 and [t[0] for t in run.tests] == [0, 1, 2, 3]
    assert accs1 == accs0 and [t[1] for t in run.tests] == accs0
    for a, b in ((q0, q1), (g0, g1)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    assert o1.param_groups[0]["lr"] == pytest.approx(0.01) and zaq.RecordingVisdom.lines == lines0
    run.done()
    assert not path.exists()


def test_a_kept_state_of_other_settings_or_without_resume_is_not_used(tmp_path):
    path = tmp_path / "s.resume.pt"
    with pytest.raises(_Stop):
        _fake_main(zaq.EpochResume(path, {"argv": ["--seed", "0"]}, resume=True), 3, stop_at=2)
    assert zaq.EpochResume(path, {"argv": ["--seed", "1"]}, resume=True).resumed_from_epoch is None
    assert zaq.EpochResume(path, {"argv": ["--seed", "0"]}, resume=False).resumed_from_epoch is None
    assert zaq.EpochResume(path, {"argv": ["--seed", "0"]}, resume=True).resumed_from_epoch == 1


def test_the_child_gets_its_epoch_state_file_in_the_cell_and_the_resume_flag(tmp_path):
    a = _parse(["--official", "c", "--out", str(tmp_path), "--resume"])
    args = zaq.child_args(a, 2, Path("/tmp/s"))
    assert args[args.index("--epoch-state") + 1] == str(tmp_path / "w4a4-cpu" / "official-s2.resume.pt")
    child = _parse([*args, "--child"])
    assert child.resume and child.epoch_state.endswith("official-s2.resume.pt")
    assert "--resume" not in zaq.child_args(_parse(["--official", "c"]), 0, Path("/tmp/s"))


def test_run_child_streams_the_log_keeps_earlier_attempts_and_reads_the_last_json_line(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys, json\nprint('progress', flush=True)\nprint('warn', file=sys.stderr)\n"
                      "print(json.dumps({'top1': float(sys.argv[-1])}))\nsys.exit(int(float(sys.argv[-1]) < 0))\n")
    log = tmp_path / "official-s0.log.txt"
    assert common.run_child(script, ["1.5"], log)["top1"] == 1.5
    with pytest.raises(SystemExit, match="exit 1"):
        common.run_child(script, ["-2"], log, append=True)
    text = log.read_text()
    assert text.count("$ ") == 2 and text.count("progress") == 2 and "warn" in text and '{"top1": -2.0}' in text
    assert common.run_child(script, ["3"], log)["top1"] == 3.0 and log.read_text().count("$ ") == 1


def test_the_dfqbench_side_in_sweeps_is_the_tables_run_of_the_cell_reused_not_recomputed(tmp_path, monkeypatch):
    over = ["method=zaq", "quant=gdfq", "schedule=cpu", "wbit=4", "abit=4", "model=resnet20_cifar10",
            "dataset=cifar10", "seed=1", "threads=1"]
    # by hand, conf/config.yaml's hydra.sweep: results/sweeps/<model>-<dataset>/<quant>/<method>/w<W>a<A>-s<S>,
    # the cpu schedule without a suffix, another schedule with -<name>
    assert common.sweep_record_path(over) == \
        common.REPO / "results/sweeps/resnet20_cifar10-cifar10/gdfq/zaq/w4a4-s1/record.json"
    assert common.sweep_record_path([*over, "schedule=cpu_long"]).parent.name == "w4a4-s1-cpu_long"
    sweep = tmp_path / "sweeps" / "record.json"
    monkeypatch.setattr(common, "sweep_record_path", lambda overrides: sweep)
    calls = []

    def fake_run(cmd, cwd=None, stdout=None, stderr=None):
        calls.append(cmd)
        run_dir = [Path(c.split("=", 1)[1]) for c in cmd if c.startswith("hydra.run.dir=")]
        out = run_dir[0] / "record.json" if run_dir else sweep
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"status": "done", "seed": 1, "top1": 12.5}))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    dest = tmp_path / "cell" / "dfqbench-gdfq-s1"
    r = common.run_dfqbench(over, dest, tmp_path / "cell" / "dfqbench.log.txt", in_sweeps=True)
    assert r["top1"] == 12.5 and json.loads((tmp_path / "cell" / "dfqbench-gdfq-s1.record.json").read_text()) == r
    common.run_dfqbench(over, dest, tmp_path / "cell" / "dfqbench.log.txt")  # the parity cell's own run
    multirun = [cmd[cmd.index("dfqbench") + 1] == "-m" for cmd in calls]  # python -m dfqbench -m ...
    assert multirun == [True, False] and "paths.output_dir=results" in calls[0]
    assert "force=true" not in calls[0] and "force=true" in calls[1]


def test_at_alpha_0_scrm_is_skipped_and_the_loss_is_unchanged():
    main_mod = types.SimpleNamespace(SCRM="the code's")
    patches = []
    zaq.skip_scrm_at_alpha0(main_mod, 1.0, patches)
    assert main_mod.SCRM == "the code's" and patches == []
    zaq.skip_scrm_at_alpha0(main_mod, 0.0, patches)
    assert patches[0].startswith("Z7")
    g = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    logits = torch.randn(2, 10, requires_grad=True)
    alpha = 0.0
    loss = torch.nn.functional.l1_loss(logits, torch.zeros(2, 10)) + alpha * main_mod.SCRM()(g, g)
    loss.backward()  # as main.py's loss_Q: alpha x SCRM adds nothing, and the gradient flows as before
    assert float(loss) == pytest.approx(float(logits.abs().mean())) and logits.grad is not None
