"""Parity driver for ClusterQ (DiamondSheep/ClusterQ, a GDFQ-frame code): the official trainer on a dfqbench teacher
and test set at a dfqbench schedule's budget, beside `python -m dfqbench method=clusterq quant=gdfq
schedule=<schedule>` on the same cell. It is scripts/parity/gdfq.py (same options, same child, same records:
results/parity/clusterq/w<W>a<A>-<schedule>/) with a `clusterq` entry in its family table and what this code needs
in addition, at run time only:

    git clone /work/.mirror/DiamondSheep+ClusterQ/repo /tmp/clusterq-official
    python scripts/parity/clusterq.py --official /tmp/clusterq-official [--seeds 0] [--dfqbench] [--resume]
    python scripts/parity/clusterq.py --check-term --official /tmp/clusterq-official   # seconds, no training

  - the hocon: cifar10.hocon (dataset "cifar10": the code's CIFAR-10 branches, latent_dim 10, batch 512 ->
    the schedule's) with, besides gdfq.py's budget keys, crop_ratio = 0.8 (options.py reads it; cifar10.hocon
    lacks it and the published code stops with a KeyError; 0.8 is imagenet.hocon's) and soft_stat_epoch = the
    schedule's warmup_epochs (the hocon's own relation: both 10 of 400; C_BNS acts when epoch > soft_stat_epoch);
  - source rewrites (each found exactly once): gdfq.py's (`iters = 200`, `if epoch < 4:`, the GPU-id assert on
    CPU) and ExperimentDesign.run's commented-out teacher test `#test_error, ... = self.trainer.test_teacher(0)`
    put back (a no-grad pass over the test set before training: the record's FP32 top-1; no RNG is drawn);
  - Ori_models/resnet20_cifar10.pth (main.py loads it after get_model) = the dfqbench teacher's state_dict,
    written into the run's scratch folder (the code's working directory);
  - modules the code imports but does not need here: `conditional_batchnorm` (gan.py imports it for the
    ImageNet generator; not in the repository) and `lmdb` (the ImageNet loader's; not installed) -> stubs that
    raise if used; `torch.utils.tensorboard`
    (main.py's SummaryWriter; tensorboard is not installed) -> a writer that writes nothing.
Its `random.uniform` (the augmentation's per-batch coin) is never seeded by the code: official runs are not
repeatable even at a fixed --id.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gdfq  # noqa: E402
import gdfq_family  # noqa: E402

METHOD = "clusterq"
TEACHER_FILE = "Ori_models/resnet20_cifar10.pth"  # main.py _set_model, cifar10 branch
CROP_RATIO = 0.8

gdfq.__file__ = __file__  # gdfq.main starts its child processes with this script (the entry and patches below)
gdfq_family.FAMILY[METHOD] = gdfq_family.Entry(
    "DiamondSheep/ClusterQ", "main.py", "trainer", "cifar10.hocon", dataset="cifar10",
    rewrites=gdfq_family._budget_rewrites("main", "trainer") + (
        gdfq_family.SourceRewrite("main:ExperimentDesign", "run",
                                  "#test_error, test_loss, test5_error = self.trainer.test_teacher(0)",
                                  "test_error, test_loss, test5_error = self.trainer.test_teacher(0)",
                                  why="the code's own (commented-out) teacher test, put back: the FP32 top-1"),),
    tested=True)

_notes: list[str] = []


def _install_child_patches(a) -> None:
    """What the ClusterQ code needs beyond gdfq.child's patches (see the module docstring)."""
    # 1. modules it imports without needing them
    stub_dir = Path(a.scratch) / "stubs"
    stub_dir.mkdir(parents=True, exist_ok=True)
    (stub_dir / "conditional_batchnorm.py").write_text(
        "class CategoricalConditionalBatchNorm2d:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise RuntimeError('conditional_batchnorm stub: only the ImageNet generator uses it')\n")
    (stub_dir / "lmdb.py").write_text("def open(*args, **kwargs):\n"
                                      "    raise RuntimeError('lmdb stub: only the ImageNet loader uses it')\n")
    sys.path.append(str(stub_dir))  # after the clone's folder (gdfq.child puts it first): used only if absent there
    _notes.append("conditional_batchnorm (imported by gan.py for the ImageNet generator, not in the repository) and "
                  "lmdb (imported by dataloader.py via data_utils/get_imagenet.py, not installed) -> stubs that "
                  "raise if used")
    import torch.utils
    tb = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, *args, **kwargs):
            pass

        def add_scalar(self, *args, **kwargs):
            pass

        def close(self):
            pass

    tb.SummaryWriter = SummaryWriter
    sys.modules["torch.utils.tensorboard"] = tb
    torch.utils.tensorboard = tb
    _notes.append("torch.utils.tensorboard.SummaryWriter (tensorboard not installed) -> a writer that writes nothing")

    # 2. the teacher file main.py loads, and the hocon keys cifar10.hocon lacks
    teacher_and_data = common.teacher_and_data

    def teacher_and_data_writing_file(overrides):
        cfg, loaded, data = teacher_and_data(overrides)
        import torch
        path = Path(a.scratch) / TEACHER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}, path)
        _notes.append(f"{TEACHER_FILE} (loaded by main.py after get_model) = the dfqbench teacher's state_dict "
                      f"(sha256 {loaded.sha256[:16]}), in the run's working directory")
        return cfg, loaded, data

    common.teacher_and_data = teacher_and_data_writing_file
    write_hocon = gdfq_family.write_hocon

    def write_hocon_clusterq(base, dest, overrides):
        extra = {"crop_ratio": CROP_RATIO, "soft_stat_epoch": int(overrides["warmup_epochs"])}
        overrides.update(extra)  # gdfq.child's dict: the record's hocon_appended shows them too
        return write_hocon(base, dest, overrides)

    gdfq_family.write_hocon = write_hocon_clusterq
    apply_rewrites = gdfq_family.apply_rewrites

    def apply_rewrites_and_notes(entry, values, cpu):
        return apply_rewrites(entry, values, cpu) + _notes + [
            f"hocon: crop_ratio = {CROP_RATIO} (cifar10.hocon lacks it; imagenet.hocon's), soft_stat_epoch = "
            "warmup_epochs (the hocons' relation)"]

    gdfq_family.apply_rewrites = apply_rewrites_and_notes


def check_term(official: Path, out: Path, threads: int = 1, batch: int = 64, seed: int = 0) -> dict:
    """The official Trainer's own hook_fn_forward / compute_BNS_loss / compute_class_BNS_loss / update_soft_stat on
    the dfqbench teacher (random input images, no training) beside dfqbench's BNRecorder + `bns` + `class_bns`:
    values and input gradients, with the code's D_BNS noise drawn as it draws it and with it zeroed; and the code's
    centroids after an update_soft_stat pass against the teacher's running statistics."""
    import json
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F
    from torch import nn

    from dfqbench.train.losses import BNStatLoss, ClassBNS, Step
    from dfqbench.train.trainer import BNRecorder
    torch.set_num_threads(threads)
    a = SimpleNamespace(model="resnet20_cifar10", dataset="cifar10", teacher=[], max_samples=None)
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    teacher = loaded.model.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    classes = int(cfg.model.num_classes)
    gdfq_family.purge_modules(("utils", "trainer", "options"))
    sys.path.insert(0, str(Path(official).resolve()))
    common.cpu_only_cuda_calls(torch.device("cpu"))
    import trainer as official_trainer
    t = object.__new__(official_trainer.Trainer)  # only the attributes these methods read
    t.mean_list, t.var_list, t.teacher_running_mean, t.teacher_running_var = [], [], [], []
    t.MSE_loss, t.model_teacher = nn.MSELoss(), teacher
    t.settings = SimpleNamespace(nClasses=classes, soft_stat_batchsize=1, latent_dim=10, soft_decay=0.2,
                                 crop_ratio=CROP_RATIO)
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    executed = []  # the BNs in execution order (a projection shortcut's BN runs before its unit's body)
    order = [m.register_forward_pre_hook(lambda m, i: executed.append(m)) for m in bns]
    with torch.no_grad():
        teacher(torch.zeros(2, 3, 32, 32))
    for h in order:
        h.remove()
    handles = [m.register_forward_hook(t.hook_fn_forward) for m in bns]
    t.BN_layer_num = len(bns)
    t.start_layer = int((t.BN_layer_num + 1) / 2) - 2  # Trainer.__init__'s line
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)

    def official(noise: bool):
        x = images.clone().requires_grad_(True)
        t.mean_list.clear(), t.var_list.clear()
        logits = teacher(x)
        # init_soft_stat's assignment: soft_mean[c][l] = teacher_running_mean[l] (what the hook stored)
        t.soft_mean = {c: [t.teacher_running_mean[l] for l in range(t.BN_layer_num)] for c in range(classes)}
        t.soft_var = {c: [t.teacher_running_var[l] for l in range(t.BN_layer_num)] for c in range(classes)}
        float_tensor = torch.FloatTensor
        if not noise:  # torch.FloatTensor(shape).uniform_(-a, a) -> zeros
            torch.FloatTensor = lambda shape: SimpleNamespace(uniform_=lambda lo, hi: torch.zeros(shape))
        try:
            torch.manual_seed(seed)
            c_bns = t.compute_class_BNS_loss(labels, logits)[0]
        finally:
            torch.FloatTensor = float_tensor
        b = t.compute_BNS_loss()[0]
        gc, = torch.autograd.grad(c_bns, x, retain_graph=True)
        gb, = torch.autograd.grad(b, x)
        return float(c_bns.detach()), float(b.detach()), gc, gb

    c_noise, b_off, gc_noise, gb_off = official(True)
    c_zero, _, gc_zero, _ = official(False)
    # update_soft_stat with a stand-in generator: for class c, a test image the teacher classifies as c (so that
    # the code's EMA update runs for every class; the code's generator image would be used there)
    pick = {}
    for x_test, y_test in data.batches(500, "cpu"):  # (the test set is stored class by class)
        with torch.no_grad():
            pred = teacher(x_test).argmax(1)
        for c in set(y_test.tolist()) - set(pick):
            hit = x_test[(pred == c) & (y_test == c)][:1]
            if hit.shape[0]:
                pick[c] = hit
        if len(pick) == classes:
            break
    t.generator = lambda z, lab: pick[int(lab[0])]
    import random
    random.seed(seed)  # the augmentation's coin (the code never seeds it)
    correct_before = sum(int(pick[c].shape[0] == 1) for c in range(classes))
    t.update_soft_stat()
    drift = max(float((t.soft_mean[c][l] - bn.running_mean).abs().max())
                for c in range(classes) for l, bn in enumerate(executed))
    updated = sum(int(any(m is not r for m, r in zip(t.soft_mean[c], t.teacher_running_mean))) for c in range(classes))
    for h in handles:
        h.remove()

    rec = BNRecorder(teacher)
    x = images.clone().requires_grad_(True)
    logits = rec.run(teacher, x)
    step = Step(x, F.one_hot(labels, classes).float(), teacher_logits=logits, bn_stats=lambda: rec.stats)
    ours_c = ClassBNS(dbns_weight=0.0)(step)
    ours_full = ClassBNS()(step)
    ours_b = BNStatLoss()(step)
    g_c, = torch.autograd.grad(ours_c, x, retain_graph=True)
    g_full, = torch.autograd.grad(ours_full, x, retain_graph=True)
    g_b, = torch.autograd.grad(ours_b, x)
    ours_c, ours_full, ours_b = ours_c.detach(), ours_full.detach(), ours_b.detach()
    rec.close()

    def rel(u, v):
        return float((u - v).abs().max() / v.abs().max().clamp_min(1e-30))

    result = {
        "teacher": cfg.model.name, "bn_layers": len(bns), "start_layer": t.start_layer,
        "K": len(bns) - t.start_layer, "batch": batch, "images": "randn (seeded), no training",
        "official_c_bns_noise_zeroed": c_zero, "dfqbench_class_bns_dbns_weight_0": float(ours_c),
        "c_bns_rel_diff": abs(c_zero - float(ours_c)) / abs(c_zero),
        "c_bns_input_grad_rel_diff": rel(g_c, gc_zero),
        "official_c_bns_with_noise": c_noise, "official_0.1xD_BNS": c_noise - c_zero,
        "dfqbench_0.1xD_BNS": float(ours_full) - float(ours_c),
        "expected_0.1xD_BNS": 0.1 * batch * (len(bns) - t.start_layer) * (0.03 ** 2 + 0.05 ** 2) / 3,
        "official_grad_noise_vs_zeroed_rel_diff": rel(gc_noise, gc_zero),
        "dfqbench_grad_with_dbns_rel_diff": rel(g_full, g_c),
        "official_bns": b_off, "dfqbench_bns": float(ours_b), "bns_input_grad_rel_diff": rel(g_b, gb_off),
        "update_soft_stat": {"classes_with_a_probe_image": correct_before, "classes_updated": updated,
                             "max_abs_diff_to_running_mean": drift,
                             "note": "the code's EMA mixes the running statistics with themselves: the centroids "
                                     "stay the running statistics (up to float rounding), for every class"},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "class-bns-check.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--check-term":  # --check-term --official CLONE [--out DIR]
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("--check-term", action="store_true")
        p.add_argument("--official", required=True)
        p.add_argument("--out", default=str(common.REPO / "results" / "parity" / METHOD))
        p.add_argument("--threads", type=int, default=1)
        a = p.parse_args(argv)
        import json
        print(json.dumps(check_term(Path(a.official), Path(a.out), a.threads), indent=1))
        return
    if "--method" not in argv:
        argv = ["--method", METHOD, *argv]
    if "--child" in argv and "--check" not in argv:
        a = argparse_child(argv)
        _install_child_patches(a)
    gdfq.main(argv)


def argparse_child(argv):
    import argparse
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--scratch", default="")
    a, _ = p.parse_known_args(argv)
    if not a.scratch:
        raise SystemExit("clusterq parity child: --scratch is missing")
    return a


if __name__ == "__main__":
    main()
