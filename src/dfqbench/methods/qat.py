"""Generator-based data-free QAT (GDFQ, Qimera, AIT, ...): one Method configured entirely by its yaml.

The yaml picks the generator and the loss terms by name (dfqbench.train.generators / .losses), the optimizer
settings, AIT's gradient inundation, and reads the training schedule from the `schedule` config group
(`schedule: ${schedule}`). The method returns the final student; the runner evaluates it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import torch
from torch import nn

from ..quant import quantize_model, weight_quantizers
from ..train.ema import MODES
from ..train.generators import GENERATORS
from ..train.losses import GENERATOR_LOSSES, STUDENT_LOSSES, build_terms
from ..train.registry import build
from ..train.schedule import Schedule
from ..train.trainer import Trainer, TrainSettings
from .base import Method
from ..settings import check_int, refuse_unknown

_DEBUG_KEYS = ("stop_after_epoch", "keep_checkpoint")  # do not change what is computed: left out of the fingerprint


class GeneratorQAT(Method):
    stochastic = True

    def __init__(self, name: str = "gdfq", schedule: dict | None = None, generator: dict | None = None,
                 generator_losses: dict | None = None, student_losses: dict | None = None,
                 student_optim: dict | None = None, generator_optim: dict | None = None, lr_decay: float = 0.1,
                 generator_steps: int = 1, student_steps: int = 1, ema_beta: float = 0.9,
                 inundation: dict | None = None, perturb_epsilon: float = 0.0, best_epoch_on_test: bool = False,
                 stop_after_epoch: int | None = None, keep_checkpoint: bool = False,
                 warmup_generator: dict | None = None, warmup_generator_losses: dict | None = None,
                 student_mode: str = "eval", range_tracking: str = "ema", schedule_overrides: dict | None = None,
                 student_batches: str = "reuse", student_eval_in_generator_step: bool = False,
                 perturb_through_teacher: bool = False, warmup_batch_size: int | None = None, **kwargs):
        super().__init__(name, **kwargs)
        if not schedule:
            raise ValueError("method.schedule is missing: the method yaml needs `schedule: ${schedule}`")
        self.schedule_overrides = dict(schedule_overrides or {})
        self.schedule = _schedule(schedule, self.schedule_overrides)
        self.generator_spec = dict(generator or {"name": "gdfq"})
        fixed = not getattr(GENERATORS.get(self.generator_spec.get("name")), "trainable", True)
        self._check_generator()
        if fixed and generator_losses:
            raise ValueError(f"method.generator.name={self.generator_spec['name']} trains no generator: "
                             f"method.generator_losses must be empty, not {sorted(generator_losses)}")
        self.generator_terms = build_terms(generator_losses, GENERATOR_LOSSES, "method.generator_losses",
                                           allow_empty=fixed)
        # IntraQ/HAST: a separate warm-up generator with its own losses; AdvKD: warm-up losses alone (no
        # warmup_generator), the same generator trained on them during the warm-up epochs
        self.warmup_spec = dict(warmup_generator) if warmup_generator else None
        self.warmup_terms = []
        if self.warmup_spec:
            self._check_generator(self.warmup_spec, "method.warmup_generator")
        if self.warmup_spec or warmup_generator_losses:
            if fixed and not self.warmup_spec:
                raise ValueError("method.warmup_generator_losses without method.warmup_generator trains the "
                                 "main generator, but method.generator.name="
                                 f"{self.generator_spec['name']} trains none")
            self.warmup_terms = build_terms(warmup_generator_losses, GENERATOR_LOSSES,
                                            "method.warmup_generator_losses")
        self.student_terms = build_terms(student_losses, STUDENT_LOSSES, "method.student_losses")
        self.settings = _train_settings(student_optim or {}, generator_optim or {}, lr_decay, generator_steps,
                                        student_steps, ema_beta, inundation or {}, perturb_epsilon,
                                        best_epoch_on_test, stop_after_epoch, keep_checkpoint, student_mode,
                                        range_tracking, student_batches, student_eval_in_generator_step,
                                        perturb_through_teacher, warmup_batch_size)
        self.spec = {"generator": self.generator_spec, "generator_losses": generator_losses,
                     "warmup_generator": self.warmup_spec, "warmup_generator_losses": warmup_generator_losses,
                     "student_losses": student_losses, "schedule": self.schedule.to_dict(),
                     "settings": {k: v for k, v in vars(self.settings).items() if k not in _DEBUG_KEYS}}

    def _check_generator(self, spec: dict | None = None, key: str = "method.generator") -> None:
        """Build the generator once on a tiny stand-in problem: bad names and settings fail before any work."""
        spec = dict(self.generator_spec if spec is None else spec)
        name = spec.pop("name", None)
        width = spec.get("latent_dim")
        width = width if isinstance(width, int) and not isinstance(width, bool) and width > 0 else 8
        try:
            build(GENERATORS, name, f"{key}.name", spec, num_classes=4, image_shape=(3, 8, 8),
                  teacher_fc=torch.zeros(4, width))
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(key) else f"{key}: {msg}") from None

    def build_teacher(self, model: nn.Module, ctx) -> nn.Module:
        """The FP32 teacher the generator and the student learn from (DFED: an ensemble around the model)."""
        return copy.deepcopy(model).eval()

    def quantize(self, model: nn.Module, ctx):
        teacher = self.build_teacher(model, ctx)
        generator = self._build_generator(self.generator_spec, teacher, ctx)
        warmup = self._build_generator(self.warmup_spec, teacher, ctx) if self.warmup_spec else None
        if hasattr(generator, "prepare"):  # a fixed synthetic set: made (or loaded from the cache) once
            generator.prepare(teacher, ctx, self.schedule.fixed_set_images, self.schedule.fixed_set_iterations)
        student = quantize_model(model, ctx.convention, ctx.wbit, ctx.abit)
        for wq in weight_quantizers(student):
            wq.dynamic = True  # the weights change every step: their grid follows (GDFQ's per-step min/max)
        trainer = Trainer(teacher, student, generator, self.generator_terms, self.student_terms, self.schedule,
                          self.settings, ctx.device, ctx.seed, run_dir=getattr(ctx, "run_dir", None),
                          fingerprint=self.fingerprint(ctx), progress=ctx.progress,
                          test_eval=getattr(ctx, "test_eval", None) if self.settings.best_epoch_on_test else None,
                          warmup_generator=warmup, warmup_terms=self.warmup_terms,
                          compile_mode=getattr(ctx, "compile", "none"))
        info = trainer.fit()
        if getattr(generator, "record_info", None):  # e.g. the searched generator's genotype
            ctx.info["generator"] = generator.record_info
        ctx.info["schedule"] = self.schedule.name
        if self.schedule_overrides:
            ctx.info["schedule_overrides"] = self.schedule_overrides
        ctx.info["training"] = info
        for name, term in self.generator_terms:
            if getattr(term, "needs_class_probes", False):  # ClusterQ's class_ema: how often the centroids moved
                ctx.info.setdefault("generator_terms", {})[name] = dict(term.probes)
        if info.get("best_epoch_on_test"):
            ctx.info["best_epoch_on_test"] = True
        return student

    @staticmethod
    def _build_generator(spec: dict, teacher: nn.Module, ctx) -> nn.Module:
        spec = dict(spec)
        name = spec.pop("name")
        return build(GENERATORS, name, "method.generator.name", spec, num_classes=ctx.num_classes,
                     image_shape=tuple(ctx.input_shape), teacher_fc=_classifier_weight(teacher))

    def fingerprint(self, ctx) -> str:
        """What a checkpoint must match to be resumed: the method's settings and the run's problem."""
        blob = {"method": self.name, "spec": self.spec, "wbit": ctx.wbit, "abit": ctx.abit, "seed": ctx.seed,
                "convention": ctx.convention.to_dict(), "teacher": ctx.model_sha256,
                "input_shape": list(ctx.input_shape), "num_classes": ctx.num_classes}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _schedule(schedule: dict, overrides: dict, key: str = "schedule_overrides") -> Schedule:
    """The schedule group, with a method's own fields over it (ZAQ: no warm-up, ranges tracked in every epoch)."""
    refuse_unknown(overrides, set(Schedule.__dataclass_fields__) - {"name"}, f"method.{key}")
    return Schedule.from_dict({**schedule, **overrides})


def _classifier_weight(model: nn.Module) -> torch.Tensor | None:
    """The teacher's classifier weight [classes, features]: a last 1x1 convolution (pytorchcv's MobileNetV2
    classifies with one after the pool; Qimera's code squeezes its weight the same way), else the last nn.Linear."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    last = layers[-1] if layers else None
    if isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1) and last.groups == 1:
        return last.weight.detach().flatten(1).clone()
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return linears[-1].weight.detach().clone() if linears else None


def _number(key: str, value, low: float, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
        raise ValueError(f"{key}={value!r} is not valid; use a number in {left}{low}, "
                         f"{'inf' if high is None else high}{right}")
    return float(value)


def _keys(key: str, given: dict, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"{key}: unknown setting(s) {unknown}; valid: {list(valid)}")


def _train_settings(student_optim, generator_optim, lr_decay, generator_steps, student_steps, ema_beta,
                    inundation, perturb_epsilon, best_epoch_on_test, stop_after_epoch,
                    keep_checkpoint, student_mode="eval", range_tracking="ema", student_batches="reuse",
                    student_eval_in_generator_step=False, perturb_through_teacher=False,
                    warmup_batch_size=None) -> TrainSettings:
    _keys("method.student_optim", student_optim, ("lr", "momentum", "nesterov", "weight_decay"))
    _keys("method.generator_optim", generator_optim, ("lr", "betas"))
    _keys("method.inundation", inundation, ("enabled", "threshold", "bisection_steps"))
    d = TrainSettings()
    for key, value, valid in (("method.student_mode", student_mode, ("eval", "train")),
                              ("method.range_tracking", range_tracking, MODES),
                              ("method.student_batches", student_batches, ("reuse", "fresh", "fresh_eval")),
                              ("method.student_eval_in_generator_step", student_eval_in_generator_step,
                               (True, False)),
                              ("method.perturb_through_teacher", perturb_through_teacher, (True, False))):
        if value not in valid:
            raise ValueError(f"{key}={value!r} is not valid; valid: {list(valid)}")
    if warmup_batch_size is not None and (isinstance(warmup_batch_size, bool) or not isinstance(warmup_batch_size, int)
                                          or warmup_batch_size < 1):
        raise ValueError(f"method.warmup_batch_size={warmup_batch_size!r} must be null or a positive integer")
    for key, value in (("method.generator_steps", generator_steps), ("method.student_steps", student_steps)):
        check_int(key, value)
    if stop_after_epoch is not None and (isinstance(stop_after_epoch, bool) or not isinstance(stop_after_epoch, int)
                                         or stop_after_epoch < 1):
        raise ValueError(f"method.stop_after_epoch={stop_after_epoch!r} must be null or a positive integer")
    betas = list(generator_optim.get("betas", d.generator_betas))
    if len(betas) != 2:
        raise ValueError(f"method.generator_optim.betas={betas!r} must be two numbers in [0, 1)")
    for b in betas:
        _number("method.generator_optim.betas", b, 0.0, 1.0, high_open=True)
    threshold = None
    if inundation.get("enabled", False):
        threshold = _number("method.inundation.threshold", inundation.get("threshold", 1e-3), 0.0, 1.0, True)
    nesterov = bool(student_optim.get("nesterov", d.nesterov))
    momentum = _number("method.student_optim.momentum", student_optim.get("momentum", d.momentum), 0.0, 1.0,
                       high_open=True)
    if nesterov and momentum <= 0:
        raise ValueError("method.student_optim.nesterov=true needs method.student_optim.momentum > 0")
    return TrainSettings(
        student_lr=_number("method.student_optim.lr", student_optim.get("lr", d.student_lr), 0.0, low_open=True),
        momentum=momentum, nesterov=nesterov,
        weight_decay=_number("method.student_optim.weight_decay",
                             student_optim.get("weight_decay", d.weight_decay), 0.0),
        generator_lr=_number("method.generator_optim.lr", generator_optim.get("lr", d.generator_lr), 0.0,
                             low_open=True),
        generator_betas=(float(betas[0]), float(betas[1])),
        lr_decay=_number("method.lr_decay", lr_decay, 0.0, 1.0, True),
        generator_steps=generator_steps, student_steps=student_steps,
        ema_beta=_number("method.ema_beta", ema_beta, 0.0, 1.0, high_open=True),
        inundation_threshold=threshold,
        inundation_bisection_steps=int(inundation.get("bisection_steps", d.inundation_bisection_steps)),
        perturb_epsilon=_number("method.perturb_epsilon", perturb_epsilon, 0.0),
        best_epoch_on_test=bool(best_epoch_on_test), stop_after_epoch=stop_after_epoch,
        keep_checkpoint=bool(keep_checkpoint), student_mode=student_mode, range_tracking=range_tracking,
        student_batches=student_batches, student_eval_in_generator_step=bool(student_eval_in_generator_step),
        perturb_through_teacher=bool(perturb_through_teacher), warmup_batch_size=warmup_batch_size,
    )
