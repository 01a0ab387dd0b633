"""The AdvKD / DFED parity drivers (scripts/parity/advkd.py, dfed.py, third_party.py) without their clones: the exact
text rewrites (on fake files written here, not the clones' text), the rewritten file run with the driver's hooks,
the student swap (dfqbench quantizers, EMA ranges only while calibrating), the schedule both sides train with, and
the parent's records and results/parity.csv row (labelled unofficial) with the child and dfqbench runs faked."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "parity"))
import advkd  # noqa: E402
import common  # noqa: E402
import dfed  # noqa: E402
import third_party as tp  # noqa: E402

from dfqbench.quant import ActQuantizer, Convention, weight_quantizers  # noqa: E402
from dfqbench.records import code_digest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# --- text rewrites ----------------------------------------------------------------------------------------------

def test_rewrite_replaces_exactly_once_and_keeps_the_line_count():
    text = "a = 1\nb = f(a)\nprint(b)\n"
    out, notes = tp.apply_rewrites(text, [tp.TextRewrite("R1", "f(a)", "g(a, {k})", why="because")], {"k": 3})
    assert out == "a = 1\nb = g(a, 3)\nprint(b)\n"
    assert notes == ["R1 the clone's file: 'f(a)' -> 'g(a, 3)' (because)"]


@pytest.mark.parametrize("text,found", [("x = 1\n", 0), ("f(a)\nf(a)\n", 2)])
def test_a_rewrite_not_found_exactly_once_stops_the_run(text, found):
    with pytest.raises(tp.RewriteMismatch, match=f"rewrite R1: 'f\\(a\\)' found {found} times, expected 1"):
        tp.apply_rewrites(text, [tp.TextRewrite("R1", "f(a)", "g(a)")], where="x.py")
    # count=2 accepts the second text
    if found == 2:
        assert tp.apply_rewrites(text, [tp.TextRewrite("R1", "f(a)", "g(a)", count=2)])[0] == "g(a)\ng(a)\n"


def test_rewrites_are_counted_in_the_original_text_and_may_not_add_lines():
    # the second rewrite's text appears only after the first one: it is not found in the clone's text
    with pytest.raises(tp.RewriteMismatch, match="rewrite R2"):
        tp.apply_rewrites("f(a)\n", [tp.TextRewrite("R1", "f(a)", "h(a)"), tp.TextRewrite("R2", "h(a)", "k(a)")])
    with pytest.raises(ValueError, match="changes the number of lines"):
        tp.apply_rewrites("f(a)\n", [tp.TextRewrite("R1", "f(a)", "f(a)\ng(a)")])


def test_load_module_and_run_script_run_the_rewritten_file_with_injected_hooks(tmp_path):
    mod_file = tmp_path / "fake_mod.py"
    mod_file.write_text("def twice(x):\n    return 2 * x\n\ndef f(x):\n    return twice(x)\n")
    calls = []
    mod, notes, sha = tp.load_module(mod_file, "fake_parity_mod", [tp.TextRewrite("M1", "return twice(x)",
                                                                                 "return _parity(twice(x))")],
                                     inject={"_parity": lambda v: calls.append(v) or v + 1})
    assert mod.f(3) == 7 and calls == [6] and sys.modules["fake_parity_mod"] is mod and len(sha) == 64
    assert "M1 fake_mod.py" in notes[0]
    script = tmp_path / "script.py"
    script.write_text("import sys\nresult = [len(sys.argv), sys.argv[1]]\nif __name__ == '__main__':\n"
                      "    result.append(_parity)\n")
    g, _, _ = tp.run_script(script, ["--x"], inject={"_parity": "hook"})
    assert g["result"] == [2, "--x", "hook"] and g["__file__"] == str(script)
    with pytest.raises(tp.RewriteMismatch):
        tp.run_script(script, [], [tp.TextRewrite("S1", "not there", "")])


# A stand-in for dfqad.py (AdvKD's re-implementation), written for this test: the lines the driver rewrites, in a
# loop of the same shape (warm-up generator steps, main epochs each ending with a test).
FAKE_DFQAD = '''
class DFQAD():
    def __init__(self, opt, student, generator):
        self.opt, self.student, self.generator, self.log = opt, student, generator, []

    def build(self,summary):
        self.warm_up(summary)
        for epoch in range(self.opt.n_epochs):
            for i in range(self.opt.iter):
                if epoch % 10 == 0 and i==0:
                    print ("[Epoch %d/%d] [loss_logit: %f] [loss_oh: %f]" \\
                % (epoch, self.opt.n_epochs,l_l.item(),1.0))
            self.test(summary,epoch)

    def warm_up(self, summary, epochs=50):
        for epoch in range(epochs):
            for i in range(self.opt.iter):
                gen_imgs = None
                l_s = _Loss()
                l_s.backward()
                self.optimizer_G.step()
        print('-'*30+'Warm up end'+'-'*30)

    def test(self,summary,epoch):
        self.log.append(("test", epoch))


class _Loss:
    def backward(self):
        pass
'''


class _Opt:
    def step(self):
        pass


def _tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


class _TinyGenerator(nn.Module):
    def __init__(self, latent=5):
        super().__init__()
        self.fc = nn.Linear(latent, 3 * 4 * 4)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, z):
        return self.bn(self.fc(z).view(-1, 3, 4, 4))


@pytest.mark.parametrize("warmup,calib", [(2, 2), (2, 1), (1, 2)])
def test_advkd_rewrites_on_a_fake_dfqad_calibrate_during_the_warmup_then_freeze(tmp_path, warmup, calib):
    path = tmp_path / "dfqad.py"
    path.write_text(FAKE_DFQAD)
    hooks = advkd.Hooks(warmup, calib, student_steps=3)
    mod, notes, _ = tp.load_module(path, "fake_dfqad", advkd.REWRITES, {"warmup_epochs": warmup},
                                   inject={"_parity": hooks})
    assert [n.split()[0] for n in notes] == ["A1", "A2", "A2", "A3", "A4", "A4"]
    torch.manual_seed(0)
    student = tp.calibrated_student(_tiny_net(), Convention.from_dict({"name": "gdfq"}), 4, 4)
    gen = _TinyGenerator().train()
    opt = types.SimpleNamespace(n_epochs=3, iter=2, batch_size=4, latent_dim=5)
    obj = mod.DFQAD(opt, student, gen)
    obj.optimizer_G = _Opt()
    student.eval()
    obj.build(None)  # the l_l print (a NameError in the clone) is gone
    assert obj.log == [("test", 0), ("test", 1), ("test", 2)]
    assert hooks.warmup_steps == warmup * 2
    calibrated_epochs = min(warmup, calib)
    assert hooks.calib_passes == calibrated_epochs * 2 * 3 == student.observed_batches
    assert gen.training and not student.training  # modes put back after each calibration pass
    assert not student.observer.active and student.observer._handles == []  # frozen
    assert hooks.frozen_after == (["warm-up", calib] if calib < warmup else ["main", 0] if calib == warmup
                                  else ["main", calib - warmup])
    assert all(r is not None for r in student.ranges())


# A stand-in for DFED.py's lines the driver rewrites (not its text): teachers with different BN counts.
FAKE_DFED = '''
hooks = [[1.0] * 3, [10.0] * 2, [100.0] * 5]
rescale = [5] + [1. for _ in range(len(hooks[0]) - 1)]
seen = []
for epoch in range(2):
    meter_train.reset()
    loss_bns = sum(sum([mod * rescale[idx] for (idx, mod) in enumerate(hooks[i])]) for i in range(3))
    seen.append(loss_bns)
'''


def test_dfed_rewrites_on_a_fake_script_weight_each_members_first_bn_and_count_epochs(tmp_path):
    path = tmp_path / "DFED.py"
    path.write_text(FAKE_DFED)
    meter = types.SimpleNamespace(reset=lambda: None)
    with pytest.raises(IndexError):  # the clone's list is as long as the first member's BN list
        tp.run_script(path, [], inject={"meter_train": meter})
    student = tp.calibrated_student(_tiny_net(), Convention.from_dict({"name": "gdfq"}), 4, 4)
    hooks = dfed.Hooks(1, lambda: [student])
    g, notes, _ = tp.run_script(path, [], dfed.REWRITES + (dfed.THREE_TEACHERS,),
                                inject={"meter_train": meter, "_parity": hooks, "args": types.SimpleNamespace(num_t=3)})
    # 5 on each member's first BN, 1 elsewhere: (5 + 2) + (50 + 10) + (500 + 400)
    assert g["seen"] == [967.0, 967.0] and [n.split()[0] for n in notes] == ["D5", "D7", "D6"]
    assert hooks.epochs == 2 and hooks.frozen_at == 1 and student.observer._handles == []


# --- the student swap -----------------------------------------------------------------------------------------

def test_student_swap_has_dfqbench_quantizers_and_observes_only_while_calibrating():
    torch.manual_seed(0)
    teacher = _tiny_net()
    conv = Convention.from_dict({"name": "gdfq"})
    student = tp.calibrated_student(teacher, conv, 4, 4, observe=lambda m, x: m.training and not x.requires_grad)
    wqs = weight_quantizers(student)
    assert len(wqs) == 2 and all(wq.dynamic for wq in wqs)
    assert tp.quantizer_counts(student) == {"weight_quantizers": 2, "act_quantizers": 1}
    assert all(p1 is not p2 for p1, p2 in zip(student.parameters(), teacher.parameters()))  # a copy
    act = next(m for m in student.modules() if isinstance(m, ActQuantizer))
    x = torch.randn(8, 3, 6, 6)
    student.train()
    student(x)  # not calibrating: passes through, nothing observed
    assert student.observed_batches == 0 and not act.calibrated
    student.calibrating = True
    student.eval()
    student(x)  # eval mode: not observed
    student.train()
    student(x.clone().requires_grad_(True))  # a generator-step batch: not observed
    assert student.observed_batches == 0
    student(x)
    assert student.observed_batches == 1 and act.calibrated
    hi = float(act.hi)
    student.stop_calibration()
    student(x * 10)
    assert float(act.hi) == hi and student.observed_batches == 1 and not student.calibrating
    # the weights are fake-quantized: the output differs from the float teacher's
    student.eval()
    with torch.no_grad():
        assert not torch.allclose(student(x), teacher(x))


def test_out_feature_adapter_and_timed_loader():
    Adapter = dfed._adapter_class()
    net = _tiny_net()
    x = torch.randn(2, 3, 5, 5)
    a = Adapter(net)
    torch.testing.assert_close(a(x, False), net(x))
    with pytest.raises(RuntimeError, match="out_feature=True"):
        a(x, True)
    data = types.SimpleNamespace(num_samples=5, batches=lambda bs, device: iter(
        [(torch.zeros(min(bs, 5 - i), 3), torch.zeros(min(bs, 5 - i))) for i in range(0, 5, bs)]))
    loader = tp.TimedLoader(data, 2, "cpu")
    assert len(loader) == 3 and len(loader.dataset) == 5
    assert sum(len(y) for _, y in loader) == 5 and loader.passes == 1 and loader.seconds >= 0


# --- the schedule both sides train with -----------------------------------------------------------------------

def test_schedule_overrides_reach_both_sides_over_advkd_per_setting():
    assert tp.dfqbench_schedule_overrides(["epochs=2", "milestones=[1]"]) == [
        "schedule.epochs=2", "++method.schedule_overrides.epochs=2", "schedule.milestones=[1]",
        "++method.schedule_overrides.milestones=[1]"]
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        tp.dfqbench_schedule_overrides(["epochs"])
    cpu = tp.effective_schedule(tp.method_config(["method=advkd", "schedule=cpu"]))
    assert (cpu["epochs"], cpu["iters_per_epoch"], cpu["warmup_epochs"]) == (10, 6, 4)  # advkd's cpu entry
    smoke = tp.effective_schedule(tp.method_config(
        ["method=advkd", "schedule=cpu", *tp.dfqbench_schedule_overrides(["iters_per_epoch=2", "epochs=5"])]))
    assert (smoke["epochs"], smoke["iters_per_epoch"]) == (5, 2)
    dfed_cpu = tp.effective_schedule(tp.method_config(["method=dfed", "schedule=cpu"]))
    assert (dfed_cpu["epochs"], dfed_cpu["iters_per_epoch"], dfed_cpu["milestones"]) == (10, 60, [8])


# --- the parent: records and the parity.csv row ---------------------------------------------------------------

def test_parent_writes_records_and_an_unofficial_row(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    clone.mkdir()
    for f in dfed.SPEC.code_files:
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        (clone / f).write_text(f"# {f}\n")
    monkeypatch.setattr(common, "clone_identity", lambda path, repo, marker: (repo, "c" * 40))
    children = []

    def fake_child(script, args, log, env=None, append=False):
        seed = int(args[args.index("--seed") + 1])
        children.append(seed)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("$ child\n")
        a = types.SimpleNamespace(**{"official": str(clone), "wbit": 4, "abit": 4, "lr_s": None, "quant": "gdfq",
                                     "method_overrides": [], "max_samples": 100, "model": "resnet20_cifar10",
                                     "dataset": "cifar10"})
        sched = tp.effective_schedule(tp.method_config(tp.method_overrides_list(full, "dfed")))
        r = {**tp.expected_settings(a, dfed.SPEC, "c" * 40, sched), "top1": 50.0 + seed, "dfqbench_eval_top1": 50.0,
             "train_s": 10.0, "wall_s": 11.0, "s_per_iteration": 1.0, "n_test": 100, "device": "cpu",
             "ensemble": ["a", "b", "c"], "lr_s": 0.1}
        return r

    def fake_dfqbench(overrides, dest, log, allow_diverged=False, in_sweeps=False):
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        r = {"status": "done", "seed": seed, "wbit": 4, "abit": 4, "top1": 80.0 + seed, "quantize_time_s": 9.0,
             "fingerprint": {"code": code_digest()},
             "info": {"training": {"epochs": 2, "iters_per_epoch": 1, "batch_size": 16, "train_time_s": 8.0}}}
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.with_name(dest.name + ".record.json").write_text(json.dumps(r))
        return r

    monkeypatch.setattr(common, "run_child", fake_child)
    monkeypatch.setattr(common, "run_dfqbench", fake_dfqbench)
    argv = ["--official", str(clone), "--seeds", "0", "1", "--schedule-override", "epochs=2", "iters_per_epoch=1",
            "warmup_epochs=1", "calib_epochs=1", "batch_size=16", "--max-samples", "100", "--out",
            str(tmp_path / "out"), "--csv", str(tmp_path / "parity.csv"), "--dfqbench"]
    import argparse
    p = argparse.ArgumentParser()
    tp.add_arguments(p, dfed.SPEC)
    full = p.parse_args(argv)
    tp.parent(full, dfed.SPEC, Path(dfed.__file__), dfed.describe_official)
    cell = tmp_path / "out" / "w4a4-cpu"
    assert children == [0, 1]
    official = json.loads((cell / "official.json").read_text())
    assert official["top1_mean"] == 50.5 and official["official_is"].startswith("UNOFFICIAL re-implementation")
    rows = list(csv.DictReader(open(tmp_path / "parity.csv")))
    assert len(rows) == 1 and rows[0]["method"] == "dfed" and rows[0]["official_top1_mean"] == "50.50"
    assert rows[0]["dfqbench_top1_mean"] == "80.50" and rows[0]["note"].startswith("unofficial re-implementation")
    # --resume: the finished seeds of both sides are kept; a changed learning rate runs again in its own cell
    children.clear()
    tp.parent(p.parse_args(argv + ["--resume"]), dfed.SPEC, Path(dfed.__file__), dfed.describe_official)
    assert children == []
    with pytest.raises(SystemExit, match="other settings"):  # the fake child ignores --lr-s
        tp.parent(p.parse_args(argv + ["--lr-s", "1e-4"]), dfed.SPEC, Path(dfed.__file__), dfed.describe_official)
    assert tp.cell_of(p.parse_args(argv + ["--lr-s", "1e-4"]), dfed.SPEC) == (tmp_path / "out" / "lrS0.0001" /
                                                                             "w4a4-cpu", "lrS0.0001")
    # --dfqbench-variant: dfqbench runs with other settings beside the same official seeds (none run again)
    seen = []
    children.clear()
    monkeypatch.setattr(common, "run_dfqbench",
                        lambda overrides, dest, log, allow_diverged=False, in_sweeps=False:
                        seen.append((overrides, dest.name)) or fake_dfqbench(overrides, dest, log))
    variant = ["--dfqbench-variant", "code_loop", "++method.student_mode=train"]
    tp.parent(p.parse_args(argv + ["--resume"] + variant), dfed.SPEC, Path(dfed.__file__), dfed.describe_official)
    assert children == []
    assert [d for _, d in seen] == ["dfqbench-gdfq-code_loop-s0", "dfqbench-gdfq-code_loop-s1"]
    assert all("++method.student_mode=train" in o and o[-2:] == [f"seed={s}", "threads=1"]
               for (o, _), s in zip(seen, (0, 1)))
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "parity.csv"))}
    assert sorted(rows) == ["dfed", "dfed-code_loop"]
    assert rows["dfed-code_loop"]["official_top1_mean"] == "50.50"
    assert rows["dfed-code_loop"]["note"].startswith("dfqbench with ++method.student_mode=train (variant code_loop")
    assert json.loads((cell / "dfqbench-code_loop.json").read_text())["overrides"][-1] == "++method.student_mode=train"
    assert (cell / "dfqbench.json").exists() and (cell / "dfqbench-gdfq-s0.record.json").exists()
    with pytest.raises(SystemExit, match="expected a NAME"):
        tp.parent(p.parse_args(argv + ["--resume", "--dfqbench-variant", "code loop", "x=1"]), dfed.SPEC,
                  Path(dfed.__file__), dfed.describe_official)


def test_same_code_as_tells_whether_the_code_files_changed_since_a_commit(tmp_path):
    import subprocess
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "DFED.py").write_text("x = 1\n")
    (tmp_path / "readme.md").write_text("a\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    first = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "readme.md").write_text("b\n")  # a readme-only change (as DFED's clone HEAD)
    assert tp.same_code_as(tmp_path, first, ("DFED.py",)) is True
    (tmp_path / "DFED.py").write_text("x = 2\n")
    assert tp.same_code_as(tmp_path, first, ("DFED.py",)) is False
    assert tp.same_code_as(tmp_path, "0" * 40, ("DFED.py",)) is None


def test_dfqbench_side_reuses_accepted_records_and_refuses_a_run_of_other_settings(tmp_path, monkeypatch):
    """common.dfqbench_side (every driver's dfqbench runs): --resume keeps a record `accept` passes, reruns one it
    does not, and stops when a fresh run does not match."""
    runs = []

    def fake_run(overrides, dest, log, allow_diverged=False, in_sweeps=False):
        runs.append(overrides)
        record = {"top1": 80.0 + len(runs), "quantize_time_s": 1.0, "seed": int(overrides[0])}
        dest.with_name(dest.name + ".record.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(common, "run_dfqbench", fake_run)
    now = {"code": code_digest()}
    (tmp_path / "dfqbench-gdfq-s0.record.json").write_text(json.dumps({"top1": 70.0, "seed": 0, "fingerprint": now}))
    (tmp_path / "dfqbench-gdfq-s1.record.json").write_text(json.dumps({"top1": 75.0, "seed": 99, "fingerprint": now}))
    ours = common.dfqbench_side(tmp_path, "gdfq", [0, 1], True, lambda s: [str(s)], "m",
                                accept=lambda r, s: r["seed"] == s)
    assert [r["top1"] for r in ours] == [70.0, 81.0] and runs == [["1"]]
    with pytest.raises(SystemExit, match="did not run the cell's settings"):
        common.dfqbench_side(tmp_path, "gdfq", [2], False, lambda s: [str(s)], "m", accept=lambda r, s: False)


def test_dfqbench_side_runs_again_a_kept_record_of_other_dfqbench_source(tmp_path, monkeypatch, capsys):
    """--resume reuses a kept record only when its fingerprint's code digest is the current source's (as the
    sweeps do): a record of older code, or one without a fingerprint, is run again and replaced."""
    runs = []

    def fake_run(overrides, dest, log, allow_diverged=False, in_sweeps=False):
        runs.append(overrides)
        record = {"top1": 81.0, "seed": int(overrides[0]), "fingerprint": {"code": code_digest()}}
        dest.with_name(dest.name + ".record.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(common, "run_dfqbench", fake_run)
    (tmp_path / "dfqbench-gdfq-s0.record.json").write_text(
        json.dumps({"top1": 70.0, "seed": 0, "fingerprint": {"code": "0123456789abcdef"}}))
    (tmp_path / "dfqbench-gdfq-s1.record.json").write_text(json.dumps({"top1": 75.0, "seed": 1}))
    ours = common.dfqbench_side(tmp_path, "gdfq", [0, 1], True, lambda s: [str(s)], "m")
    assert [r["top1"] for r in ours] == [81.0, 81.0] and runs == [["0"], ["1"]]
    assert "written by another dfqbench source (code 0123456789abcdef" in capsys.readouterr().out
    ours = common.dfqbench_side(tmp_path, "gdfq", [0, 1], True, lambda s: [str(s)], "m")
    assert len(runs) == 2 and [r["top1"] for r in ours] == [81.0, 81.0]


def test_dfqbench_side_keeps_a_diverged_seed_only_when_the_driver_allows_it(tmp_path, monkeypatch):
    """A kept record of a diverged training (a failed record, no top1) is a result for a driver that allows it
    (gdfq.py: the row counts it in dfqbench_diverged); any other driver reruns the seed."""
    runs = []

    def fake_run(overrides, dest, log, allow_diverged=False, in_sweeps=False):
        runs.append((overrides, allow_diverged))
        return {"status": "done", "top1": 81.0, "quantize_time_s": 1.0}

    monkeypatch.setattr(common, "run_dfqbench", fake_run)
    failed = {"status": "failed", "error": "TrainingDiverged: training diverged: student loss term 'kd' is nan at "
                                           "epoch 6/10, iteration 41/60; the last good checkpoint is kept: /x"}
    failed["fingerprint"] = {"code": code_digest()}
    (tmp_path / "dfqbench-gdfq-s0.record.json").write_text(json.dumps(failed))
    ours = common.dfqbench_side(tmp_path, "gdfq", [0], True, lambda s: [str(s)], "m", allow_diverged=True)
    assert ours == [failed] and runs == [] and common.diverged(ours[0])
    assert common._outcome(failed) == "training diverged: student loss term 'kd' is nan at epoch 6/10, iteration 41/60"
    ours = common.dfqbench_side(tmp_path, "gdfq", [0], True, lambda s: [str(s)], "m")
    assert [r["top1"] for r in ours] == [81.0] and runs == [(["0"], False)]
    assert not common.diverged({"status": "failed", "error": "ValueError: x"})


def test_run_dfqbench_returns_a_diverged_record_only_when_allowed(tmp_path, monkeypatch):
    """run_dfqbench: a non-zero exit with a diverged record is that record (allow_diverged) or an error; a
    non-zero exit with any other failed record is always an error."""
    import subprocess

    def fake_subprocess(error):
        def run(cmd, **kwargs):
            folder = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
            (folder / "record.json").write_text(json.dumps({"status": "failed", "error": error}))
            return subprocess.CompletedProcess(cmd, 1)
        return run

    dest, log = tmp_path / "dfqbench-gdfq-s0", tmp_path / "log.txt"
    monkeypatch.setattr(common.subprocess, "run", fake_subprocess("TrainingDiverged: training diverged: x"))
    assert common.run_dfqbench(["seed=0"], dest, log, allow_diverged=True)["status"] == "failed"
    assert json.loads((tmp_path / "dfqbench-gdfq-s0.record.json").read_text())["status"] == "failed"
    with pytest.raises(subprocess.CalledProcessError):
        common.run_dfqbench(["seed=0"], dest, log)
    monkeypatch.setattr(common.subprocess, "run", fake_subprocess("ValueError: bad"))
    with pytest.raises(subprocess.CalledProcessError):
        common.run_dfqbench(["seed=0"], dest, log, allow_diverged=True)


def test_dfed_note_gives_the_codes_test_before_and_after_the_ranges_freeze():
    runs = [{"epoch_top1": [70.0, 75.0, 40.0, 30.0], "calibration": {"frozen_at_epoch": 2}},
            {"epoch_top1": [72.0, 71.0, 35.0, 20.0], "calibration": {"frozen_at_epoch": 2}}]
    assert dfed._around_the_freeze(runs) == ("; the code's per-epoch test, mean over the seeds, '|' where the "
                                             "ranges freeze: 71.0 73.0 | 37.5 25.0")
    runs[1]["calibration"]["frozen_at_epoch"] = None  # never froze (calibration epochs >= epochs): nothing to say
    assert dfed._around_the_freeze(runs) == ""
