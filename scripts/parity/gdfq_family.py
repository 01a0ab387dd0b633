"""Run-time patching shared by the parity drivers of the GDFQ training family (xushoukai/GDFQ and the forks built on
its code: Qimera, AIT, IntraQ, HAST, AdaSG, AdaDFQ). Their repositories share one frame: a main script
(`--conf_path X.hocon --id N`) whose ExperimentDesign loads pytorchcv teachers, wraps them in ZeroQ-style
quantizers, builds a Trainer(trainer.py / trainer_direct.py) and calls run(); the budget is partly in the hocon
file (nEpochs, batchSize, warmup_epochs, step_S/step_G) and partly hard-coded (`iters = 200` in Trainer.train,
`epoch < 4` for the activation-range calibration in ExperimentDesign.run).

What this module changes in a clone, at run time only, in the driver's child process:
  - the hocon file: the clone's own, with the budget appended (HOCON: a later key overrides an earlier one);
  - source rewrites of named functions: exact substrings of the clone's source, each found the stated number of
    times or the run stops (`SourceRewrite`); the rewritten function is compiled from the clone's text and set on
    its class; every rewrite is listed in the record;
  - an entry script that does not compile as shipped (AdaSG/AdaDFQ's main.py): exact substring rewrites of its
    text before it is compiled (`Entry.script_rewrites`, `import_file`), keeping every line where it is;
  - the teacher (pytorchcv get_model -> the clone's own pytorchcv architecture with the dfqbench checkpoint's
    state_dict: the clone's resnet_cifar has the `out_feature` argument the trainers call), the test loader (the
    dfqbench test set), the device (.cuda() -> cpu, utils.data_parallel -> the model itself).

IntraQ and HAST train on a fixed synthetic set that their own data_generate/generate_data.py writes (stage 1,
pickles of `group` 1..4, 5 batches of 256 each, 1,000 Adam steps per batch) before main_direct.py (stage 2) reads
it: `Entry.synth` runs that script in the same child, first, at the schedule's fixed_set_images /
fixed_set_iterations (`Synth`), with the same teacher patch and its own source rewrites.

`FAMILY` is the table of entry points. Every entry has been run end to end (`tested: True`): gdfq, qimera,
qimera_ait and arc_ait at the cpu schedule (results/parity/), ait, intraq and hast at smoke budgets, adasg and
adadfq at a smoke budget and a 4 x 30-iteration sanity budget (their rewrites found, the final epoch's top-1
read); a new entry starts at
`tested: False`: check it before trusting a number. tests/test_parity_gdfq_family.py finds every rewrite's anchor
in the clones (or mirrors) present.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SourceRewrite:
    """Replace `old` by `new` in the source of `owner.attr` (owner: "module:Class" or "module"), where `old` must
    occur exactly `count` times."""
    owner: str
    attr: str
    old: str
    new: str
    count: int = 1
    why: str = ""
    cpu_only: bool = False


@dataclass(frozen=True)
class Synth:
    """Stage 1 of the fixed-set codes (IntraQ, HAST): `script` (relative to the clone) run as __main__ once per
    group, `argv` ({model}, {batch}, {group}, {out} filled in), after `rewrites` of its `module`. The official
    set is 4 groups x `per_group` batches of `batch`; the schedule's fixed_set_images becomes
    ceil(images / per_group / batch) groups of up to `per_group` batches."""
    script: str
    module: str
    argv: tuple
    rewrites: tuple
    batch: int = 256
    per_group: int = 5


def synth_layout(images: int, batch: int = 256, per_group: int = 5) -> tuple[int, int, int]:
    """(batch, batches per group, groups) of a fixed set of `images`: the code's stage 1 writes equal groups of up
    to `per_group` batches (its own set: 5,120 = 4 x 5 x 256)."""
    batch = min(batch, images)
    batches = -(-images // batch)
    per = min(per_group, batches)
    groups = -(-batches // per)
    if batches * batch != images or groups * per != batches:
        raise SystemExit(f"fixed_set_images {images}: not whole groups of up to {per_group} batches of {batch} "
                         f"(the code's stage 1 writes equal groups)")
    return batch, per, groups


@dataclass(frozen=True)
class Entry:
    repo: str                      # owner/name
    main: str                      # the entry script, relative to the clone (or its subdir)
    trainer: str                   # the trainer module name
    conf: str                      # the CIFAR hocon file the budget is appended to
    subdir: str = ""               # where main.py lives inside the clone (AIT: GDFQ_AIT/, Qimera_AIT/)
    dataset: str = "cifar100"      # the `dataset` key: selects the code's CIFAR branches
    extra_argv: tuple = ()         # more arguments of main()
    rewrites: tuple = field(default_factory=tuple)
    tested: bool = False
    id_argv: bool = True           # main() takes --id S (manualSeed S+1); False: a rewrite sets manualSeed
    synth: Synth | None = None     # stage 1 (the fixed synthetic set) before main()
    hocon_extra: tuple = ()        # more hocon keys: (key, value) with {data_head}/{label_head}/{model} filled in
    distributed: bool = False      # main() calls torch.distributed (env:// with one process, as a launcher's);
                                   # without a GPU its `DDP` name -> OneProcessDDP
    stubs: tuple = ()              # modules imported but not needed (not installed): "torch.utils.tensorboard"
    aliases: tuple = ()            # (module, name, from_module): names a newer pytorchcv moved
    script_rewrites: tuple = ()    # SourceRewrites (attr "") of the entry script's text before it is compiled, for
                                   # a script that does not compile as shipped; line numbers kept (import_file)
    warmup_batch_rewrites: tuple = ()  # applied only for the driver's --warmup-batch N ({warmup_batch}): the
                                       # generator warm-up's hard-coded batch -> N (a labelled variant cell)


def _budget_rewrites(main_mod: str, trainer_mod: str, trainer_cls: str = "Trainer", run_cls: str = "ExperimentDesign",
                     calib_in_trainer: int = 0, gpu_assert: bool = True, accuracy_view: bool = False) -> tuple:
    out = [
        SourceRewrite(f"{trainer_mod}:{trainer_cls}", "train", "iters = 200", "iters = {iters_per_epoch}",
                      why="iterations per epoch (hard-coded 200) -> the schedule's"),
        SourceRewrite(f"{main_mod}:{run_cls}", "run", "if epoch < 4:", "if epoch < {calib_epochs}:",
                      why="activation-range calibration epochs (hard-coded 4) -> the schedule's calib_epochs"),
    ]
    if gpu_assert:
        out.append(SourceRewrite(f"{main_mod}:{run_cls}", "_set_gpu",
                                 'assert self.settings.GPU <= torch.cuda.device_count() - 1, "Invalid GPU ID"', "pass",
                                 why="no GPU: the GPU-id check is left out", cpu_only=True))
    if accuracy_view:  # GDFQ's utils/compute.py (the forks already use .reshape or .contiguous())
        out.append(SourceRewrite("utils.compute", "accuracy", "correct[:k].view(-1)", "correct[:k].reshape(-1)",
                                 why="PyTorch >= 1.13 keeps the transposed layout of `correct`, which .view(-1) "
                                     "refuses (RuntimeError); the same numbers"))
    if calib_in_trainer:
        out.append(SourceRewrite(f"{trainer_mod}:{trainer_cls}", "train", "if epoch < 4:",
                                 "if epoch < {calib_epochs}:", count=calib_in_trainer,
                                 why="the trainer's own calibration-epoch test (hard-coded 4)"))
    return tuple(out)


def _warmup_batch(device_call: str) -> tuple:
    """IntraQ/HAST warm up their GDFQ generator (and calibrate the activation ranges on its images) at a batch of
    16 hard-coded in Trainer.train; `device_call` is how the line moves the tensor (.cuda() / .to(...))."""
    why = ("the generator warm-up's batch (hard-coded 16; dfqbench: method.warmup_batch_size) -> the driver's "
           "--warmup-batch: a labelled variant, not the code's own setting")
    return (SourceRewrite("trainer_direct:Trainer", "train",
                          f"torch.randn(16, self.settings.latent_dim)){device_call}",
                          f"torch.randn({{warmup_batch}}, self.settings.latent_dim)){device_call}", why=why),
            SourceRewrite("trainer_direct:Trainer", "train",
                          f"torch.randint(0, self.settings.nClasses, (16,))){device_call}",
                          f"torch.randint(0, self.settings.nClasses, ({{warmup_batch}},))){device_call}", why=why))


def _copy_sources(owner: str, attr: str, files=("main_direct.py", "trainer_direct.py")) -> tuple:
    """The IntraQ/HAST ExperimentDesign copies its own sources from the working directory ('./main_direct.py') into
    its log folder; the driver runs in a scratch folder: copy them from the clone."""
    return tuple(SourceRewrite(owner, attr, f"'./{f}'", f"'{{root}}/{f}'",
                               why="the code copies its own source into its log folder from the working "
                                   "directory; the driver's working directory is a scratch folder")
                 for f in files)


def _plateau_verbose(method: str) -> SourceRewrite:
    return SourceRewrite("distill_data:DistillData", method, "verbose=False,", "",
                         why="ReduceLROnPlateau's `verbose` (False: prints nothing) was removed in PyTorch 2.x "
                             "(TypeError); the same scheduler")


def _ada_rewrites(hocon_keys: tuple = ()) -> tuple:
    """hfutqian's AdaSG and AdaDFQ (<code>/CIFAR: the same main.py, options.py, utils/ and trainer.py frame, GDFQ's
    code): the budget, GDFQ's utils/compute.py, and two breakages of the shipped code."""
    reads = "".join(f"\n\tself.{k} = self.conf['{k}']" for k in ("network", *hocon_keys))
    return _budget_rewrites("main", "trainer", accuracy_view=True) + (
        SourceRewrite("options:Option", "__init__", "self.b2 = self.conf['b2']", "self.b2 = self.conf['b2']" + reads,
                      why="the shipped options.py (GDFQ's) does not read the hocon keys the code uses: "
                          "ExperimentDesign._set_model reads settings.network (AttributeError)"
                          + (", trainer.train settings." + "/".join(hocon_keys) if hocon_keys else "")
                          + "; each is read from the hocon as shipped"),
        SourceRewrite("trainer", "marginal_loss", "torch.zeros(16)", "torch.zeros(h_info_prime.shape[0])",
                      why="the hinge's zero vector is hard-coded to 16 entries ('#batch size 16', the hocon's "
                          "batchSize): torch.max(h', zeros(16)) cannot broadcast at another batch (RuntimeError) -> "
                          "one entry per sample; at batch 16 the same tensor"),
    )


# main.py's ImageNet branch of _set_model: `if self.settings.network in [...]:` with its body at the `if`'s own
# indentation (IndentationError: the file does not compile, on any Python 3)
_ADA_MAIN_FIX = SourceRewrite(
    "main", "", 'if self.settings.network in ["resnet18", "mobilenetv2_w1", "resnet50"]:',
    'if self.settings.network in ["resnet18", "mobilenetv2_w1", "resnet50"]: pass',
    why="main.py does not compile as shipped (IndentationError): the ImageNet branch's `if` has no indented body; "
        "`pass` gives it one (the lines below it stay unconditional; never reached on CIFAR)")


_QIMERA_D_ACC = SourceRewrite(
    "trainer:Trainer", "train", "d_acc = np.mean(np.argmax(output_teacher_batch.data.cpu().numpy(), axis=1) == gt)",
    "d_acc = np.mean(np.argmax(output_teacher_batch.data.cpu().numpy(), axis=1) == gt) if gt.ndim == 1 else 0.0",
    why="a logged statistic only: on a superposed batch gt is [B, K]; numpy < 1.25 compared the mismatched shapes "
        "to a scalar False (mean 0.0), numpy >= 1.25 raises")
_AIT_THRESHOLD_EPOCHS = SourceRewrite(
    "main", "main", "default=[100,200,300]", "default={milestones}",
    why="gradient inundation's threshold x0.1 epochs (--threshold_decay_ep, type=int: a list cannot be passed on "
        "the command line; its default is the paper's lr milestones 100/200/300) -> the schedule's milestones")

FAMILY: dict[str, Entry] = {
    "gdfq": Entry("xushoukai/GDFQ", "main.py", "trainer", "cifar100_resnet20.hocon",
                  rewrites=_budget_rewrites("main", "trainer", accuracy_view=True), tested=True),
    # run_cifar10_4bit.sh's flags: superposed samples (prob 0.4, 2 classes) and random embeddings; without them
    # main.py's defaults train GDFQ with teacher-classifier embeddings (multi_label_prob 0.0), not Qimera
    "qimera": Entry("iamkanghyunchoi/qimera", "main.py", "trainer", "cifar10_resnet20.hocon", dataset="cifar10",
                    rewrites=_budget_rewrites("main", "trainer") + (_QIMERA_D_ACC,),
                    extra_argv=("--multi_label_prob", "0.4", "--multi_label_num", "2", "--randemb"), tested=True),
    # GDFQ_AIT/run_cifar10_4bit.sh's flags (its --qw/--qa come from the hocon the driver writes)
    "ait": Entry("iamkanghyunchoi/ait", "main.py", "trainer", "cifar10_resnet20.hocon", subdir="GDFQ_AIT",
                 dataset="cifar10", rewrites=_budget_rewrites("main", "trainer") + (_AIT_THRESHOLD_EPOCHS,),
                 extra_argv=("--ce_scale", "0.0", "--kd_scale", "1.0", "--lrs", "0.0001", "--passing_threshold",
                             "0.001", "--adalr"), tested=True),
    # Qimera_AIT/run_cifar10_4bit.sh's flags: Qimera's superposed samples (prob 0.4, 2 classes; no --randemb: the
    # embeddings start from the teacher's classifier) with AIT's KL-only loss and gradient inundation
    "qimera_ait": Entry("iamkanghyunchoi/ait", "main.py", "trainer", "cifar10_resnet20.hocon", subdir="Qimera_AIT",
                        dataset="cifar10", rewrites=_budget_rewrites("main", "trainer") + (
                            _QIMERA_D_ACC, _AIT_THRESHOLD_EPOCHS),
                        extra_argv=("--multi_label_prob", "0.4", "--multi_label_num", "2", "--ce_scale", "0.0",
                                    "--kd_scale", "1.0", "--passing_threshold", "0.001", "--adalr"), tested=True),
    # AutoReCon_AIT/run_cifar10_4bit.sh's flags (GDFQ_AIT's, the same trainer.py): main() builds the searched
    # generator of generator_architecture.py for settings.network (resnet20_cifar10 -> gen_cifar10)
    "arc_ait": Entry("iamkanghyunchoi/ait", "main.py", "trainer", "cifar10_resnet20.hocon", subdir="AutoReCon_AIT",
                     dataset="cifar10", rewrites=_budget_rewrites("main", "trainer") + (_AIT_THRESHOLD_EPOCHS,),
                     extra_argv=("--ce_scale", "0.0", "--kd_scale", "1.0", "--lrs", "0.0001", "--passing_threshold",
                                 "0.001", "--adalr"), tested=True),
    # README's stage 1 (data_generate/run_generate_cifar10.sh) then stage 2 (main_direct.py --model_name
    # resnet20_cifar10 --conf_path cifar10_resnet20.hocon --id 0)
    "intraq": Entry(
        "zysxmu/IntraQ", "main_direct.py", "trainer_direct", "cifar10_resnet20.hocon", dataset="cifar10",
        extra_argv=("--model_name", "resnet20_cifar10"),
        rewrites=_budget_rewrites("main_direct", "trainer_direct", calib_in_trainer=2) + _copy_sources(
            "main_direct:ExperimentDesign", "__init__") + (
            SourceRewrite("main_direct:ExperimentDesign", "__init__",
                          "os.path.join(self.settings.save_path, conf_path)",
                          "os.path.join(self.settings.save_path, os.path.basename(conf_path))",
                          why="the copy of the hocon: os.path.join(save_path, <absolute path>) is the file itself "
                              "(shutil.SameFileError); the code was run with a relative --conf_path"),
            SourceRewrite("trainer_direct:Trainer", "train", "if epoch == 4:", "if epoch == {calib_epochs}:",
                          why="the end of the generator warm-up (hard-coded 4, as `epoch < 4`): the generator "
                              "moves to the CPU"),
            SourceRewrite("main_direct:direct_dataset", "__init__", '"Path_to_data_pickle"', '"{data_head}"',
                          why="the stage-1 pickles (README: edit this placeholder) -> the ones the driver's stage 1 "
                              "wrote"),
            SourceRewrite("main_direct:direct_dataset", "__init__", '"Path_to_label_pickle"', '"{label_head}"',
                          why="the stage-1 label pickles (README: edit this placeholder)"),
            SourceRewrite("main_direct:direct_dataset", "__init__", "for i in range(1,5):",
                          "for i in range(1, {groups} + 1):",
                          why="the number of stage-1 groups (hard-coded 4) -> the driver's stage 1's"),
        ),
        synth=Synth("data_generate/generate_data.py", "distill_data", argv=(
            "--model={model}", "--batch_size={batch}", "--test_batch_size=512", "--group={group}",
            "--targetPro=0.95", "--cosineMargin=0.05", "--cosineMargin_upper=0.8", "--augMargin=0.5",
            "--save_path_head={out}"), rewrites=(
            SourceRewrite("distill_data:DistillData", "getDistilData_hardsample_cosineDistanceEMA_interClass_aug",
                          "if i == 5:", "if i == {synth_batches}:",
                          why="synthesized batches per group (hard-coded 5) -> the schedule's fixed_set_images"),
            SourceRewrite("distill_data:DistillData", "getDistilData_hardsample_cosineDistanceEMA_interClass_aug",
                          "for it in range(500*2):", "for it in range({fixed_set_iterations}):",
                          why="Adam steps per synthesized batch (hard-coded 1,000) -> the schedule's "
                              "fixed_set_iterations"),
            _plateau_verbose("getDistilData_hardsample_cosineDistanceEMA_interClass_aug"),
        )),
        warmup_batch_rewrites=_warmup_batch(".cuda()"), tested=True),
    # README: stage 1 (data_generate/run_generate_cifar10.sh: beta 10, gamma 2) then run.sh
    # (python -m torch.distributed.launch --nproc_per_node 1 main_direct.py --conf_path <config/cifar10_resnet20.hocon>)
    "hast": Entry(
        "lihuantong/HAST", "main_direct.py", "trainer_direct", "config/cifar10_resnet20.hocon", dataset="cifar10",
        extra_argv=("--local_rank", "0"), id_argv=False, distributed=True,
        hocon_extra=(("model_name", "{model}"), ("generateDataPath", "{data_head}"),
                     ("generateLabelPath", "{label_head}")),
        stubs=("torch.utils.tensorboard",),
        aliases=(("pytorchcv.models.mobilenet", "DwsConvBlock", "pytorchcv.models.common.conv"),),
        rewrites=_budget_rewrites("main_direct", "trainer_direct", calib_in_trainer=2, gpu_assert=False)
        + _copy_sources("main_direct:ExperimentDesign", "prepare") + (
            SourceRewrite("main_direct", "main", "option.manualSeed = 1", "option.manualSeed = {manual_seed}",
                          why="the seed (hard-coded 1, no --id) -> the driver's seed + 1, as --id S gives the "
                              "other codes (seed 0: the code's own 1)"),
            SourceRewrite("trainer_direct:Trainer", "train", "if epoch == 4:", "if epoch == {calib_epochs}:",
                          why="the end of the generator warm-up (hard-coded 4, as `epoch < 4`): BN hooks removed, "
                              "activation ranges all-reduced, the feature-alignment hooks registered"),
            SourceRewrite("main_direct:direct_dataset", "__init__", "for i in range(1,5):",
                          "for i in range(1, {groups} + 1):",
                          why="the number of stage-1 groups (hard-coded 4) -> the driver's stage 1's"),
            SourceRewrite("main_direct:ExperimentDesign", "prepare", "torch.cuda.set_device(self.args.local_rank)",
                          "pass", why="no GPU: no CUDA device to select", cpu_only=True),
            SourceRewrite("main_direct:ExperimentDesign", "prepare", "dist.init_process_group(backend='nccl')",
                          "dist.init_process_group(backend='gloo')",
                          why="no GPU: the CPU backend of the same one-process group", cpu_only=True),
            SourceRewrite("main_direct", "main", "args = parser.parse_args()",
                          "args = parser.parse_args()\n\targs.local_rank = torch.device('cpu')",
                          why="no GPU: the code moves every tensor with .to(args.local_rank) (CUDA device 0 as "
                              "torch.distributed.launch passes it) -> the CPU", cpu_only=True),
            SourceRewrite("main_direct:ExperimentDesign", "set_logger",
                          "logging.INFO if self.args.local_rank in [-1, 0] else logging.WARN", "logging.INFO",
                          why="no GPU: local_rank is the CPU device, not 0; the one process is rank 0 (INFO)",
                          cpu_only=True),
        ),
        synth=Synth("data_generate/generate_data.py", "distill_data", argv=(
            "--model={model}", "--batch_size={batch}", "--test_batch_size=512", "--group={group}", "--beta=10",
            "--gamma=2", "--save_path_head={out}"), rewrites=(
            SourceRewrite("distill_data:DistillData", "getDistilData_hardsample",
                          "for i in range(1280//batch_size):", "for i in range({synth_batches}):",
                          why="synthesized batches per group (hard-coded 1280 // 256 = 5) -> the schedule's "
                              "fixed_set_images"),
            SourceRewrite("distill_data:DistillData", "getDistilData_hardsample",
                          "for it in range(500*2):", "for it in range({fixed_set_iterations}):",
                          why="Adam steps per synthesized batch (hard-coded 1,000) -> the schedule's "
                              "fixed_set_iterations"),
            _plateau_verbose("getDistilData_hardsample"),
        )),
        warmup_batch_rewrites=_warmup_batch(".to(self.args.local_rank)"), tested=True),
    # AdaSG_code/CIFAR/run_cifar10_3bit.sh: main.py --conf_path=./cifar10_resnet20.hocon --id=01 (no other flags).
    # main.py knows only dataset "cifar100" (generator, per-epoch test): the shipped cifar10 hocon's "cifar10"
    # stops main() at `assert False, "invalid data set"`; the driver's hocon sets "cifar100", as for GDFQ, and
    # paramscheck puts back the teacher's 10 classes. marginal_loss's zero vector follows the batch (at the
    # hocon's batch 16 that changes nothing); options.py is made to read the hocon's `network`.
    "adasg": Entry("hfutqian/AdaSG", "main.py", "trainer", "cifar10_resnet20.hocon", subdir="AdaSG_code/CIFAR",
                   script_rewrites=(_ADA_MAIN_FIX,), rewrites=_ada_rewrites(), tested=True),
    # AdaDFQ/CIFAR (no CIFAR-10 script; the README's command with cifar10_resnet20.hocon): AdaSG's frame with the
    # margin bounds and loss weights in the hocon (alpha_ds 0.2, alpha_as 0.1, lambda_l 0.1, lambda_u 0.8, beta 1,
    # gamma 1), which its options.py (identical to AdaSG's) does not read: read as shipped, the driver appends
    # none of them. Same dataset / marginal_loss notes as adasg (at batch 16 the zero vector is unchanged).
    "adadfq": Entry("hfutqian/AdaDFQ", "main.py", "trainer", "cifar10_resnet20.hocon", subdir="AdaDFQ/CIFAR",
                    script_rewrites=(_ADA_MAIN_FIX,),
                    rewrites=_ada_rewrites(("alpha_ds", "alpha_as", "lambda_l", "lambda_u", "beta", "gamma")),
                    tested=True),
}


# --- the hocon file ------------------------------------------------------------------------------------------------

def hocon_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(hocon_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def write_hocon(base: Path, dest: Path, overrides: dict) -> str:
    """The clone's hocon text with `overrides` appended (later keys win); returns the appended block."""
    block = "\n# --- appended by the dfqbench parity driver (run-time budget and paths) ---\n" + "".join(
        f"{k} = {hocon_value(v)}\n" for k, v in overrides.items())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(Path(base).read_text() + "\n" + block)
    return block


# --- source rewrites ------------------------------------------------------------------------------------------------

def rewrite_function(owner, attr: str, replacements: list[tuple[str, str, int]]) -> None:
    """Recompile `owner.attr` from its own source with exact substring replacements (each found `count` times)."""
    func = getattr(owner, attr)
    func = getattr(func, "__func__", func)
    src = textwrap.dedent(inspect.getsource(func))
    if "super()" in src:
        raise SystemExit(f"{owner.__name__}.{attr}: zero-argument super() cannot be recompiled outside its class")
    for old, new, count in replacements:
        found = src.count(old)
        if found != count:
            raise SystemExit(f"{owner.__name__}.{attr}: {old!r} found {found} times in the clone's source, "
                             f"expected {count}; this clone differs from the one the driver was written for")
        src = src.replace(old, new)
    filename = inspect.getsourcefile(func) or "<official>"
    ns: dict = {}
    exec(compile(src, f"{filename} (rewritten by the parity driver)", "exec"), func.__globals__, ns)
    setattr(owner, attr, ns[func.__name__])


def apply_rewrites(entry: Entry, values: dict, cpu: bool) -> list[str]:
    """Apply entry.rewrites ({...} in `new` filled from `values`) to the imported modules (sys.modules). Returns
    the patch descriptions."""
    return apply_source_rewrites(entry.rewrites, values, cpu)


def apply_source_rewrites(rewrites, values: dict, cpu: bool) -> list[str]:
    """Apply SourceRewrites ({...} in `new` filled from `values`) to the imported modules (sys.modules)."""
    grouped: dict[tuple[str, str], list] = {}
    notes = []
    for rw in rewrites:
        if rw.cpu_only and not cpu:
            continue
        new = rw.new.format(**values)
        grouped.setdefault((rw.owner, rw.attr), []).append((rw.old, new, rw.count))
        notes.append(f"{rw.owner.replace(':', '.')}.{rw.attr}: {rw.old!r} -> {new!r} ({rw.why})")
    for (owner, attr), reps in grouped.items():
        mod_name, _, cls_name = owner.partition(":")
        obj = sys.modules[mod_name]
        if cls_name:
            obj = getattr(obj, cls_name)
        rewrite_function(obj, attr, reps)
    return notes


def import_file(path: Path, name: str, rewrites=(), notes: list | None = None):
    """Import the clone's entry script as module `name` (its `if __name__ == '__main__'` stays idle). `rewrites`
    (SourceRewrites of the whole text, e.g. Entry.script_rewrites) are made to the text before it is compiled,
    each found `count` times; they must keep every line where it is, so that later function rewrites
    (inspect.getsource reads the file) see the same lines. Their descriptions are appended to `notes`."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    if not rewrites:
        spec.loader.exec_module(mod)
        return mod
    src = Path(path).read_text()
    lines = src.count("\n")
    for rw in rewrites:
        found = src.count(rw.old)
        if found != rw.count:
            raise SystemExit(f"{path.name}: {rw.old!r} found {found} times in the clone's source, expected "
                             f"{rw.count}; this clone differs from the one the driver was written for")
        src = src.replace(rw.old, rw.new)
        if notes is not None:
            notes.append(f"{rw.owner} (the file's text, before it is compiled): {rw.old!r} -> {rw.new!r} ({rw.why})")
    if src.count("\n") != lines:
        raise SystemExit(f"{path.name}: the text rewrites moved lines (function rewrites read the file)")
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod


def purge_modules(prefixes: tuple[str, ...]) -> None:
    """Forget already-imported modules (the venv's pytorchcv) so that the clone's own copies are imported."""
    for name in list(sys.modules):
        if name.split(".")[0] in prefixes:
            del sys.modules[name]


def stub_module(name: str) -> str:
    """A stand-in for a module the code imports but does not use here (not installed); returns the note."""
    import types
    if name != "torch.utils.tensorboard":
        raise SystemExit(f"no stub for {name}")
    import torch.utils
    tb = types.ModuleType(name)

    class SummaryWriter:  # writes nothing
        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, attr):
            return lambda *args, **kwargs: None

    tb.SummaryWriter = SummaryWriter
    sys.modules[name] = tb
    torch.utils.tensorboard = tb
    return f"{name}.SummaryWriter (tensorboard is not installed; the code's only use is commented out) -> a writer " \
           f"that writes nothing"


def add_alias(module: str, name: str, source: str) -> str | None:
    """`module.name` = `source.name` where `module` lacks it (a class a newer pytorchcv moved); the note or None."""
    import importlib
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return None
    setattr(mod, name, getattr(importlib.import_module(source), name))
    return (f"{module}.{name} -> {source}.{name} (the installed pytorchcv moved it; the code only tests "
            f"isinstance() with it, for MobileNet)")


def one_process_ddp():
    """A stand-in for DistributedDataParallel in a one-process group on the CPU, where DDP refuses a module with
    SyncBatchNorm layers (HAST converts the teacher and the student): `.module` and forward() as DDP's; with one
    process DDP's gradient all-reduce (mean over 1) and its start-up broadcast from rank 0 change nothing, and the
    code passes broadcast_buffers=False."""
    from torch import nn

    class OneProcessDDP(nn.Module):
        def __init__(self, module, device_ids=None, output_device=None, broadcast_buffers=True, **kwargs):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    return OneProcessDDP
