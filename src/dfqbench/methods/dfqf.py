"""DFQF (Li et al., ACML 2020, "Data Free Quantization-aware Fine-tuning"): two stages on the shared trainer.

Stage 1 trains a generator without the quantized model: DAFL's generator against the teacher (class-balance and
BN-statistics terms) and, adversarially, against a full-precision student of the teacher's architecture trained
from scratch by KD on the generated images (DFAD's game). The FP student is then discarded.
Stage 2 freezes that generator and fine-tunes the quantized student (train mode) by KD on its images, with learned
clipping values for every weight and activation quantizer (dfqbench.quant.quantizers.clipped), initialized on 10 generated
batches. The stage-1 generator is cached per teacher, settings, schedule and seed (one stage 1 serves every
bit-width), or kept in the run folder, so a run killed in stage 2 does not redo stage 1.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..quant import quantize_model
from ..records import code_digest
from ..quant.quantizers.clipped import attach_learned_clips
from ..train.checkpoint import save_atomic
from ..train.trainer import Trainer
from .qat import GeneratorQAT, _number, _schedule, _train_settings
from ..settings import check_int


class DFQF(GeneratorQAT):
    def __init__(self, name: str = "dfqf", stage1_student_optim: dict | None = None,
                 stage1_milestones: list[float] | None = None, clip_lr_ratio: float = 0.1,
                 clip_lower_bound: float = 0.5, clip_init_batches: int = 10,
                 stage1_student_init: str = "kaiming_normal", stage1_schedule_overrides: dict | None = None,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if stage1_student_init not in STUDENT_INITS:
            raise ValueError(f"method.stage1_student_init={stage1_student_init!r} is not valid; choose one of: "
                             f"{', '.join(STUDENT_INITS)}")
        self.stage1_student_init = stage1_student_init
        fractions = list(stage1_milestones if stage1_milestones is not None else [0.4, 0.8])
        for f in fractions:
            _number("method.stage1_milestones", f, 0.0, 1.0, low_open=True, high_open=True)
        if fractions != sorted(fractions):
            raise ValueError(f"method.stage1_milestones={fractions!r} must be increasing fractions of the epochs")
        check_int("method.clip_init_batches", clip_init_batches)
        self.clip_init_batches = clip_init_batches
        self.clip_lower_bound = _number("method.clip_lower_bound", clip_lower_bound, 0.0, 1.0)
        self.settings = dataclasses.replace(
            self.settings, clip_lr_ratio=_number("method.clip_lr_ratio", clip_lr_ratio, 0.0, low_open=True))
        stage1 = _train_settings(stage1_student_optim or {}, kwargs.get("generator_optim") or {},
                                 kwargs.get("lr_decay", 0.1), 1, 1, 0.9, {}, 0.0, False, None,
                                 kwargs.get("keep_checkpoint", False), "train", "ema")
        self.stage1_settings = dataclasses.replace(stage1, decay_generator=False)
        stage1 = _schedule(self.schedule.to_dict(), dict(stage1_schedule_overrides or {}), "stage1_schedule_overrides")
        self.stage1_schedule = dataclasses.replace(
            stage1, warmup_epochs=0, milestones=tuple(sorted({max(1, round(f * stage1.epochs)) for f in fractions})))
        self.stage2_schedule = dataclasses.replace(self.schedule, warmup_epochs=0, milestones=())
        self.stage1_spec = {"generator": self.generator_spec, "generator_losses": kwargs.get("generator_losses"),
                            "student_init": stage1_student_init,
                            "student_losses": kwargs.get("student_losses"),
                            "settings": dataclasses.asdict(self.stage1_settings),
                            "schedule": self.stage1_schedule.to_dict()}
        self.spec.update(stage1=self.stage1_spec, clip_lower_bound=self.clip_lower_bound,
                         clip_init_batches=clip_init_batches,
                         settings={**self.spec["settings"], "clip_lr_ratio": self.settings.clip_lr_ratio})

    def check_convention(self, convention) -> None:
        if not convention.weight.symmetric or convention.act.sites != "after_relu":
            raise ValueError(f"method=dfqf learns symmetric weight clips and clips after each ReLU: it needs "
                             f"quant.act.sites=after_relu, not {convention.act.sites!r} (quant=dfqf is DFQF's own "
                             f"preset; valid sites: ['after_relu'])")

    def quantize(self, model: nn.Module, ctx):
        conv = ctx.convention
        self.check_convention(conv)
        teacher = copy.deepcopy(model).eval()
        generator = self._stage1_generator(teacher, ctx)
        generator.requires_grad_(False)
        student = quantize_model(model, conv, ctx.wbit, ctx.abit).eval()
        rng = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():  # DFQF calibrates on the generator as it was trained: BatchNorm in train mode
            batches = [generator(generator.sample(self.schedule.batch_size, rng).to(ctx.device))
                       for _ in range(self.clip_init_batches)]
        attach_learned_clips(student, batches, self.clip_lower_bound)
        trainer = Trainer(teacher, student, generator, [], self.student_terms, self.stage2_schedule, self.settings,
                          ctx.device, ctx.seed, run_dir=getattr(ctx, "run_dir", None),
                          fingerprint=self.fingerprint(ctx), progress=ctx.progress,
                          test_eval=getattr(ctx, "test_eval", None) if self.settings.best_epoch_on_test else None)
        info = trainer.fit()
        ctx.info.update(schedule=self.schedule.name, training=info)
        if info.get("best_epoch_on_test"):
            ctx.info["best_epoch_on_test"] = True
        return student

    # ------------------------------------------------------------------ stage 1
    def _stage1_generator(self, teacher: nn.Module, ctx) -> nn.Module:
        generator = self._build_generator(self.generator_spec, teacher, ctx).to(ctx.device)
        key = self._stage1_key(ctx)
        path = self._stage1_path(ctx, key)
        if path is not None and path.exists():
            generator.load_state_dict(torch.load(path, map_location=ctx.device, weights_only=True))
            ctx.info["stage1"] = {"cached": True}
            return generator
        student = _fresh_copy(teacher, self.stage1_student_init)
        run_dir = getattr(ctx, "run_dir", None)
        stage_dir = Path(run_dir) / "stage1" if run_dir else None
        if stage_dir is not None:
            stage_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(teacher, student, generator, self.generator_terms, self.student_terms,
                          self.stage1_schedule, self.stage1_settings, ctx.device, ctx.seed, run_dir=stage_dir,
                          fingerprint=key, progress=ctx.progress)
        ctx.info["stage1"] = trainer.fit()
        if stage_dir is not None and not any(stage_dir.iterdir()):  # its checkpoint is removed once it finished
            stage_dir.rmdir()
        if path is not None:
            save_atomic(path, generator.state_dict())
        return generator

    def _stage1_key(self, ctx) -> str:
        blob = {"stage1": self.stage1_spec, "teacher": ctx.model_sha256, "seed": ctx.seed,
                "input_shape": list(ctx.input_shape), "num_classes": ctx.num_classes, "code": code_digest()}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @staticmethod
    def _stage1_path(ctx, key: str) -> Path | None:
        if getattr(ctx, "cache_dir", None) and getattr(ctx, "model_sha256", None):
            return Path(os.path.expanduser(str(ctx.cache_dir))) / "dfqf" / f"generator-{key}.pt"
        run_dir = getattr(ctx, "run_dir", None)
        return Path(run_dir) / "stage1_generator.pt" if run_dir else None


STUDENT_INITS = ("kaiming_normal", "pytorch")


def _fresh_copy(teacher: nn.Module, init: str = "kaiming_normal") -> nn.Module:
    """The teacher's architecture with freshly initialized parameters and BN statistics (DFQF's FP student):
    every layer's PyTorch default (`pytorch`), then, for `kaiming_normal` (DFQF's code: its resnet_cifar's
    _weights_init), kaiming_normal_ (fan in, gain sqrt 2) on every conv and linear weight."""
    student = copy.deepcopy(teacher)
    for m in student.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if init == "kaiming_normal" and isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return student.requires_grad_(True).train()

