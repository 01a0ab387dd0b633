"""The shared loop of generator-based data-free QAT (GDFQ and its descendants).

Per epoch, `iters_per_epoch` iterations of:
  1. generator step(s): sample noise and labels, generate images, generator losses against the FP32 teacher
     (and the student, for adversarial terms), Adam step on the generator;
  2. student step(s): the quantized student (in eval mode: BatchNorm statistics frozen, gamma/beta trained) on
     the generated images, detached (the first student step reuses the generator step's images and teacher
     logits, as GDFQ does; further ones draw fresh images), student losses, SGD step, optionally AIT's gradient
     inundation. During the `warmup_epochs` the student is not stepped.
A fixed synthetic set (IntraQ, HAST: generator `fixed_set`, no generator loss) skips step 1: every student
step draws a fresh augmented batch. A `warmup_generator` (IntraQ/HAST: GDFQ's) replaces the generator during
the warm-up epochs: it is trained with its own losses and feeds the EMA range calibration. Warm-up losses
without a warm-up generator (AdvKD) train the main generator on them during the warm-up epochs. HAST's
`perturb_epsilon` adds the same student loss on x + eps * sign(grad_x).
Activation ranges follow an EMA of the batch ranges during the first `calib_epochs` epochs, then stay frozen
(`range_tracking: running_minmax`: a running min/max instead). `student_mode: train` runs the student's
BatchNorm on batch statistics while training, as ZAQ's code does; the returned student is in eval mode.
Learning rates are a function of the epoch (multi-step decay at the schedule's milestones), so resuming needs no
scheduler state. After every epoch the student, generator, optimizers, EMA state, RNG states and the epoch go
into `<run_dir>/checkpoint.pt` (atomic write); a rerun resumes from it when its fingerprint (the method's
settings, bits, seed, convention, teacher) and the dfqbench source (records.code_digest) match: a run is never
finished by other code than the one that started it. A NaN/inf loss stops training with TrainingDiverged naming
the epoch, iteration and term, leaving the last good checkpoint.
The teacher and the generator run at the config's `precision` (dfqbench.precision: under bf16 autocast their
outputs come back as float32); the student and its fake quantization always run in float32.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import precision
from ..precision import as_float32
from ..records import code_digest
from ..quant.quantizers import ActQuantizer
from . import checkpoint as ckpt
from .ema import EMARangeObserver
from .errors import TrainingDiverged
from .inundation import FIRST_EPOCH_CAP, GradientInundation
from ..feature_taps import FeatureTap, detach_features
from .losses import LossTerm, Step, weighted_sum
from .schedule import Schedule


# torch.compile modes the trainer accepts (config `compile`); "none" runs eagerly
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


class StopRequested(KeyboardInterrupt):
    """`stop_after_epoch` (a debug option) ends the run like a kill, right after a checkpoint."""


@dataclass
class TrainSettings:
    student_lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    generator_lr: float = 1e-3
    generator_betas: tuple[float, float] = (0.5, 0.999)
    lr_decay: float = 0.1
    generator_steps: int = 1
    student_steps: int = 1
    ema_beta: float = 0.9
    range_tracking: str = "ema"  # "running_minmax": ZAQ's running min/max (EMARangeObserver modes)
    student_mode: str = "eval"  # "train": BatchNorm on batch statistics while training (ZAQ); eval at the end
    # where the student steps' images come from: "reuse" (GDFQ: the first step reuses the generator step's batch,
    # drawn before the generator's update; further steps draw fresh ones), "fresh" (every step draws a fresh
    # batch after the update), "fresh_eval" (the same with the generator in eval mode: its running BN statistics,
    # AdvKD's R5 dfqad.py)
    student_batches: str = "reuse"
    student_eval_in_generator_step: bool = False  # AdvKD's R5: student.eval() while the generator step runs it
    inundation_threshold: float | None = None  # AIT's passing threshold; None = plain SGD steps
    inundation_bisection_steps: int = 5
    perturb_epsilon: float = 0.0  # HAST: also train on x + eps * sign(grad_x student loss); 0 = off
    # HAST's code: grad_x of the clean loss flows through the teacher's logits and features too (it reruns the
    # teacher on x with grad); False: through the student only (the teacher's outputs are fixed targets)
    perturb_through_teacher: bool = False
    # IntraQ/HAST's code: the warm-up generator's batch (and the calibration batches it feeds) is hard-coded to
    # 16 images, whatever the fine-tuning batch; None = the schedule's batch_size
    warmup_batch_size: int | None = None
    clip_lr_ratio: float = 0.1  # learned clipping values (parameters named `clip`, DFQF): lr ratio, plain SGD
    decay_generator: bool = True  # the generator's lr follows the milestones too (DFQF's stage 1: it does not)
    best_epoch_on_test: bool = False
    stop_after_epoch: int | None = None
    keep_checkpoint: bool = False


class BNRecorder:
    """Forward pre-hooks recording (batch mean, biased batch var, running mean, running var) at every BN input."""

    def __init__(self, model: nn.Module):
        self.recording, self.stats = False, []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.BatchNorm2d)]

    def _hook(self, bn, inputs):
        if self.recording:
            var, mean = torch.var_mean(as_float32(inputs[0]), dim=(0, 2, 3), unbiased=False)
            self.stats.append((mean, var, bn.running_mean, bn.running_var))

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.stats, self.recording = [], True
        try:
            return model(x)
        finally:
            self.recording = False

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Trainer:
    def __init__(self, teacher: nn.Module, student: nn.Module, generator: nn.Module,
                 generator_terms: list[tuple[str, LossTerm]], student_terms: list[tuple[str, LossTerm]],
                 schedule: Schedule, settings: TrainSettings, device: torch.device, seed: int,
                 run_dir: Path | None = None, fingerprint: str = "", progress: bool = False,
                 test_eval: Callable[[nn.Module], float] | None = None, warmup_generator: nn.Module | None = None,
                 warmup_terms: list[tuple[str, LossTerm]] = (), compile_mode: str = "none"):
        self.teacher, self.student = teacher.eval(), student.eval()
        # channels_last: the generator's convolutions cost most of an iteration, and are faster in it on CPU too
        self.generator = generator.to(device).to(memory_format=torch.channels_last).train()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.generator_terms, self.student_terms = generator_terms, student_terms
        self.schedule, self.settings, self.device = schedule, settings, device
        self.path = Path(run_dir) / ckpt.CHECKPOINT_NAME if run_dir else None
        self.fingerprint, self.progress, self.test_eval = fingerprint, progress, test_eval
        if settings.best_epoch_on_test and test_eval is None:
            raise ValueError("best_epoch_on_test=true needs the test set (the runner provides it)")
        self.rng = torch.Generator().manual_seed(seed)
        self.opt_s = _student_optimizer(self.student, settings)
        trainable = [p for p in self.generator.parameters() if p.requires_grad]
        # a fixed set (no trainable generator, no generator loss) skips the generator step
        self.opt_g = (torch.optim.Adam(trainable, lr=settings.generator_lr, betas=tuple(settings.generator_betas))
                      if trainable and generator_terms else None)
        # IntraQ/HAST: during the warm-up a separate generator is trained and feeds the EMA range calibration
        self.warmup_gen, self.warmup_terms, self.opt_wg = None, list(warmup_terms), None
        if warmup_generator is not None:
            self.warmup_gen = warmup_generator.to(device).to(memory_format=torch.channels_last).train()
            self.opt_wg = torch.optim.Adam(self.warmup_gen.parameters(), lr=settings.generator_lr,
                                           betas=tuple(settings.generator_betas))
        self.observer = EMARangeObserver(self.student, settings.ema_beta, self.rng, mode=settings.range_tracking)
        self.observer.active = False
        needs_bn = any(term.needs_bn_stats for _, term in (*generator_terms, *self.warmup_terms))
        self.bn = BNRecorder(self.teacher) if needs_bn else None
        kinds = frozenset().union(*(term.features for _, term in (*generator_terms, *self.warmup_terms,
                                                                    *student_terms)))
        self.taps = (FeatureTap(self.teacher, kinds), FeatureTap(self.student, kinds)) if kinds else None
        self.gi = (GradientInundation(self.student, settings.inundation_threshold, settings.inundation_bisection_steps)
                   if settings.inundation_threshold else None)
        self.start_epoch, self.best, self.last = 0, None, {}
        # terms that follow the schedule or the epoch (ClusterQ's class_bns: gated by epoch, per-class probes)
        for name, term in (*generator_terms, *self.warmup_terms):
            if hasattr(term, "bind_schedule"):
                term.bind_schedule(schedule)
            if getattr(term, "needs_class_probes", False) and not hasattr(self.generator, "sample_for"):
                raise ValueError(f"generator loss '{name}' needs per-class probes: a generator with sample_for "
                                 f"(method.generator.name=gdfq), not {type(self.generator).__name__}")
        self.stateful_terms = {n: t for n, t in generator_terms if hasattr(t, "state_dict")}
        self.compile_mode = compile_mode
        self._compile(compile_mode)
        self.precision, self.autocast = precision.current(), precision.autocast(device)

    def _compile(self, mode: str) -> None:
        """torch.compile each network in place (nn.Module.compile: the state_dict keys and checkpoints do not
        change; forward hooks are traced with it). On a GPU this fuses the fake-quant, BatchNorm and ReLU kernels
        of a launch-bound ResNet-20 step; `reduce-overhead` also replays CUDA graphs. Numbers may differ from the
        eager run's at the rounding level (fused arithmetic), which is why it is a labelled, hashed setting."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile={mode!r} is not valid; choose one of: {', '.join(COMPILE_MODES)}")
        if mode == "none":
            return
        # each network is its own compiled instance of a shared forward (teacher and student are one class):
        # recompiles past the default limit would fall back to eager without a word
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        for model in (self.teacher, self.student, self.generator, self.warmup_gen):
            if model is not None:
                model.compile(mode=None if mode == "default" else mode)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        s = self.schedule
        resumed = self._resume()
        t0 = time.perf_counter()
        self.student.train(self.settings.student_mode == "train")
        total = s.epochs * s.iters_per_epoch
        bar = tqdm(total=total, initial=self.start_epoch * s.iters_per_epoch, desc="qat", disable=not self.progress,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            for epoch in range(self.start_epoch, s.epochs):
                self._set_rates(epoch)
                if epoch >= s.calib_epochs:
                    self.observer.close()  # ranges frozen from here on
                for term in self.stateful_terms.values():
                    if hasattr(term, "start_epoch"):
                        term.start_epoch(epoch, self._probe, self.generator.num_classes)
                if hasattr(self.generator, "start_epoch"):  # a fixed set's per-epoch sampler
                    self.generator.start_epoch()
                for it in range(s.iters_per_epoch):
                    try:
                        self._iteration(epoch, it)
                    except RuntimeError as exc:  # e.g. a grid from infinite weights: name the step, not the op
                        if not isinstance(exc, TrainingDiverged):
                            self._check_params(f"at epoch {epoch + 1}/{s.epochs}, iteration {it + 1}/"
                                               f"{s.iters_per_epoch}")
                        raise
                    bar.update()
                    bar.set_postfix(epoch=f"{epoch + 1}/{s.epochs}", **{k: f"{v:.4g}" for k, v in self.last.items()},
                                    refresh=False)
                self._end_epoch(epoch)
        finally:
            bar.close()
            self.student.eval()
            for model in (self.teacher, self.student, self.generator, self.warmup_gen):
                if model is not None:  # undo nn.Module.compile: the returned student is evaluated eagerly
                    model._compiled_call_impl = None
        self.observer.close()
        if self.bn:
            self.bn.close()
        for tap in self.taps or ():
            tap.close()
        iters_run = (s.epochs - self.start_epoch) * s.iters_per_epoch
        seconds = time.perf_counter() - t0
        info = {"epochs": s.epochs, "iters_per_epoch": s.iters_per_epoch, "batch_size": s.batch_size,
                "train_time_s": round(seconds, 3), "iters_per_s": round(iters_run / seconds, 3) if iters_run else None,
                "final_losses": {k: round(v, 6) for k, v in self.last.items()}}
        if self.compile_mode != "none":
            info["compile"] = self.compile_mode
        if self.precision != "fp32":
            info["precision"] = self.precision
        if resumed is not None:
            info["resumed_from_epoch"] = resumed
        if self.best is not None:  # only behind best_epoch_on_test: the table labels such runs
            info.update(best_epoch_on_test=True, best_epoch=self.best["epoch"], best_epoch_top1=self.best["top1"],
                        last_epoch_top1=self.best["last_top1"])
            self.student.load_state_dict(self.best["student"])
            self._refresh_act_grids()
        if self.path and not self.settings.keep_checkpoint:
            self.path.unlink(missing_ok=True)
        return info

    def _set_rates(self, epoch: int) -> None:
        factor = self.schedule.decay_factor(epoch, self.settings.lr_decay)
        for group in self.opt_s.param_groups:
            group["lr"] = group.get("base_lr", self.settings.student_lr) * factor  # (checkpoints before groups)
        g_factor = factor if self.settings.decay_generator else 1.0
        for opt in (self.opt_g, self.opt_wg):
            for group in opt.param_groups if opt else ():
                group["lr"] = self.settings.generator_lr * g_factor
        if self.gi:  # AIT decays its passing threshold with the learning rate, caps the first student epoch
            self.gi.threshold = self.settings.inundation_threshold * factor
            self.gi.cap = FIRST_EPOCH_CAP if epoch <= self.schedule.warmup_epochs else None

    def _iteration(self, epoch: int, it: int) -> None:
        s, cfg = self.schedule, self.settings
        if self.compile_mode == "reduce-overhead":  # a new step: the CUDA graphs' previous outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        batch = None
        generator, gen_terms, opt_g = self.generator, self.generator_terms, self.opt_g
        if self.warmup_gen is not None and epoch < s.warmup_epochs:
            generator, gen_terms, opt_g = self.warmup_gen, self.warmup_terms, self.opt_wg
        elif self.warmup_terms and epoch < s.warmup_epochs:  # AdvKD: the generator's own warm-up losses
            gen_terms = self.warmup_terms
        student_mode = self.student.training
        batch_size = s.batch_size
        if generator is self.warmup_gen and cfg.warmup_batch_size:
            batch_size = cfg.warmup_batch_size
        for _ in range(cfg.generator_steps if opt_g else 0):
            sample = generator.sample(batch_size, self.rng).to(self.device)
            images = self._generate(generator, sample)
            if cfg.student_eval_in_generator_step:
                self.student.eval()
            step = Step(images, sample.targets, teacher=self._teacher_forward, student=self.student,
                        bn_stats=(lambda: self.bn.stats) if self.bn else None, taps=self.taps, epoch=epoch)
            loss, terms = weighted_sum(gen_terms, step)
            self.student.train(student_mode)
            self.last["G"] = self._checked(loss, terms, "generator", epoch, it)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            batch = (images.detach(), step.targets.detach(), step.teacher_logits.detach(),
                     detach_features(step.teacher_feature_set) if self.taps else None)
        train_student = epoch >= s.warmup_epochs
        self.observer.active = epoch < s.calib_epochs
        try:
            for j in range(cfg.student_steps):
                if batch is None or j > 0 or cfg.student_batches != "reuse":
                    batch = self._fresh_batch(generator)
                images, targets, teacher_logits, teacher_features = batch
                if not train_student:  # warm-up: the student only observes ranges (when calibrating)
                    if self.observer.active:
                        with torch.no_grad():
                            self.student(images)
                    continue
                if cfg.perturb_epsilon:
                    images = images.detach().requires_grad_(True)
                if cfg.perturb_epsilon and cfg.perturb_through_teacher:  # the teacher reruns on x, with grad
                    step = Step(images, targets, teacher=self._teach, student=self.student, taps=self.taps,
                                teacher_grad=True)
                else:
                    step = Step(images, targets, teacher_logits=teacher_logits, student=self.student,
                                taps=self.taps, teacher_features=teacher_features)
                loss, terms = weighted_sum(self.student_terms, step)
                if cfg.perturb_epsilon:
                    loss, terms = self._with_hard_samples(loss, terms, images, targets)
                self.last["S"] = self._checked(loss, terms, "student", epoch, it)
                self.opt_s.zero_grad(set_to_none=True)
                loss.backward()
                before = self.gi.snapshot() if self.gi else None
                self.opt_s.step()
                if self.gi:
                    self.gi.apply(before, self.opt_s)
        finally:
            self.observer.active = False

    @torch.no_grad()
    def _probe(self, label: int, augment: bool = True):
        """One generated image of class `label` (augmented as the generator's batches are, or not) through the
        teacher: (logits [1, classes], its BN-input statistics). ClusterQ's per-class centroid probes."""
        sample = self.generator.sample_for(torch.tensor([label]), self.rng)
        if not augment:
            sample.theta = None
        images = self._generate(self.generator, sample.to(self.device))
        return self._teacher_forward(images), list(self.bn.stats) if self.bn else []

    def _teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits, its BN-input statistics recorded on the way when a loss needs them."""
        with self.autocast:
            return as_float32(self.bn.run(self.teacher, images) if self.bn else self.teacher(images))

    def _teach(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return as_float32(self.teacher(images))

    def _generate(self, generator: nn.Module, sample) -> torch.Tensor:
        with self.autocast:
            return as_float32(generator(sample))

    def _with_hard_samples(self, loss, terms, images, targets):
        """HAST's sample-difficulty promotion: the same student loss on x + eps * sign(grad_x loss), added."""
        grad, = torch.autograd.grad(loss, images, retain_graph=True)
        hard = (images + self.settings.perturb_epsilon * grad.sign()).detach()
        with torch.no_grad():
            teacher_logits = self._teach(hard)
            features = self.taps[0].value if self.taps else None
        step = Step(hard, targets, teacher_logits=teacher_logits, student=self.student, taps=self.taps,
                    teacher_features=features)
        hard_loss, hard_terms = weighted_sum(self.student_terms, step)
        return loss + hard_loss, {**terms, **{f"hard_{k}": v for k, v in hard_terms.items()}}

    @torch.no_grad()
    def _fresh_batch(self, generator: nn.Module):
        sample = generator.sample(self.schedule.batch_size, self.rng).to(self.device)
        mode = generator.training
        generator.train(mode and self.settings.student_batches != "fresh_eval")
        try:
            images = self._generate(generator, sample)
        finally:
            generator.train(mode)
        step = Step(images, sample.targets, teacher=self._teach, taps=self.taps)
        return images, step.targets, step.teacher_logits, step.teacher_feature_set if self.taps else None

    def _checked(self, loss: torch.Tensor, terms: dict, phase: str, epoch: int, it: int) -> float:
        value = float(loss.detach())
        if math.isfinite(value):
            return value
        bad = next(((n, float(v.detach())) for n, v in terms.items() if not math.isfinite(float(v.detach()))),
                   ("total", value))
        s = self.schedule
        self._diverged(f"{phase} loss term '{bad[0]}' is {bad[1]} at epoch {epoch + 1}/{s.epochs}, iteration "
                       f"{it + 1}/{s.iters_per_epoch}")

    def _diverged(self, what: str) -> None:
        if self.path is not None and self.path.exists():
            kept = f"the last good checkpoint is kept: {self.path}"
        else:
            kept = "no checkpoint yet (none is written before the first epoch ends)"
        raise TrainingDiverged(f"training diverged: {what}; {kept}")

    # ------------------------------------------------------------------ epochs, checkpoints
    def _check_params(self, when: str) -> None:
        for name, model in (("student", self.student), ("generator", self.generator),
                            ("warm-up generator", self.warmup_gen)):
            if model is None:
                continue
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                self._diverged(f"{name} parameters are not finite {when}")

    def _end_epoch(self, epoch: int) -> None:
        self._check_params(f"after epoch {epoch + 1}/{self.schedule.epochs}")  # never checkpoint a broken model
        if self.settings.best_epoch_on_test and epoch >= self.schedule.warmup_epochs:
            top1 = float(self.test_eval(self.student))
            self.student.train(self.settings.student_mode == "train")
            self._refresh_act_grids()
            if self.best is None or top1 > self.best["top1"]:
                self.best = {"epoch": epoch + 1, "top1": top1, "student": copy.deepcopy(self.student.state_dict())}
            self.best["last_top1"] = top1
        if self.path is not None:
            ckpt.save_atomic(self.path, self._state(epoch + 1))
        if self.settings.stop_after_epoch == epoch + 1 and epoch + 1 < self.schedule.epochs:
            raise StopRequested(f"stopped after epoch {epoch + 1} (method.stop_after_epoch); run again without it "
                                f"to resume from {self.path}")

    def _state(self, epochs_done: int) -> dict:
        return {"format": 1, "fingerprint": self.fingerprint, "code": code_digest(), "epoch": epochs_done,
                "student": self.student.state_dict(), "generator": self.generator.state_dict(),
                "opt_student": self.opt_s.state_dict(),
                "opt_generator": self.opt_g.state_dict() if self.opt_g else None,
                "warmup_generator": self.warmup_gen.state_dict() if self.warmup_gen else None,
                "opt_warmup_generator": self.opt_wg.state_dict() if self.opt_wg else None,
                "observer": self.observer.state_dict(), "rng": ckpt.rng_state(self.rng), "best": self.best,
                "terms": {n: t.state_dict() for n, t in self.stateful_terms.items()}}

    def _resume(self) -> int | None:
        if self.path is None or not self.path.exists():
            return None
        state = ckpt.load(self.path, self.device)
        if state.get("fingerprint") != self.fingerprint or state.get("code") != code_digest():
            what = "configuration" if state.get("fingerprint") != self.fingerprint else "dfqbench source"
            print(f"dfqbench: {self.path} was written by another {what}; training from the start", file=sys.stderr)
            return None
        self.student.load_state_dict(state["student"])
        self.generator.load_state_dict(state["generator"])
        self.opt_s.load_state_dict(state["opt_student"])
        if self.opt_g:
            self.opt_g.load_state_dict(state["opt_generator"])
        if self.warmup_gen is not None:
            self.warmup_gen.load_state_dict(state["warmup_generator"])
            self.opt_wg.load_state_dict(state["opt_warmup_generator"])
        self.observer.load_state_dict(state["observer"])
        for name, term_state in (state.get("terms") or {}).items():
            if name in self.stateful_terms:
                self.stateful_terms[name].load_state_dict(term_state)
        ckpt.set_rng_state(self.rng, state["rng"])
        self.best, self.start_epoch = state["best"], int(state["epoch"])
        self._refresh_act_grids()
        print(f"dfqbench: resuming from {self.path} after epoch {self.start_epoch}/{self.schedule.epochs}",
              file=sys.stderr)
        return self.start_epoch

    def _refresh_act_grids(self) -> None:
        """Rebuild activation grids from the stored ranges outside inference mode (a grid first built inside
        `torch.inference_mode`, e.g. by an evaluation, cannot be used by autograd later)."""
        for q in self.student.modules():
            if isinstance(q, ActQuantizer) and q.enabled and q.calibrated:
                q.set_range(q.lo.detach().clone(), q.hi.detach().clone())


def _student_optimizer(student: nn.Module, settings: TrainSettings) -> torch.optim.SGD:
    """SGD over the student; learned clipping values (parameters named `clip`) get their own group: lr scaled by
    `clip_lr_ratio`, no momentum, no weight decay (DFQF)."""
    named = list(student.named_parameters())
    clips = [p for n, p in named if n.rpartition(".")[2] == "clip"]
    groups = [{"params": [p for n, p in named if n.rpartition(".")[2] != "clip"], "base_lr": settings.student_lr}]
    if clips:
        groups.append({"params": clips, "base_lr": settings.student_lr * settings.clip_lr_ratio, "momentum": 0.0,
                       "nesterov": False, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=settings.student_lr, momentum=settings.momentum, nesterov=settings.nesterov,
                           weight_decay=settings.weight_decay)
