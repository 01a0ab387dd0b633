"""A training schedule (conf/schedule/*.yaml): epochs x iterations, batch size, warm-up, calibration, milestones."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..settings import refuse_unknown


@dataclass(frozen=True)
class Schedule:
    name: str
    epochs: int
    iters_per_epoch: int
    batch_size: int
    warmup_epochs: int = 0  # generator-only epochs: the student is not stepped (GDFQ: 4 on CIFAR)
    calib_epochs: int = 1  # epochs in which the EMA activation ranges are updated, then frozen (GDFQ: 4)
    milestones: tuple[int, ...] = ()  # epochs at which learning rates (and AIT's threshold) are multiplied by decay
    fixed_set_images: int = 5120  # fixed-set methods (IntraQ, HAST): images synthesized before training
    fixed_set_iterations: int = 1000  # ... and optimization steps per synthesized batch

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        data = dict(data)
        refuse_unknown(data, [f.name for f in fields(cls)], "schedule")
        data["milestones"] = tuple(data.get("milestones") or ())
        schedule = cls(**data)
        schedule.validate()
        return schedule

    def validate(self) -> None:
        for key in ("epochs", "iters_per_epoch", "fixed_set_images", "fixed_set_iterations"):
            _int_at_least(key, getattr(self, key), 1, self.name)
        _int_at_least("batch_size", self.batch_size, 2, self.name)  # BatchNorm statistics need 2 samples
        _int_at_least("warmup_epochs", self.warmup_epochs, 0, self.name)
        _int_at_least("calib_epochs", self.calib_epochs, 1, self.name)
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"schedule.warmup_epochs={self.warmup_epochs} leaves no epoch to train the student "
                             f"(schedule.epochs={self.epochs}); use 0 to {self.epochs - 1}")
        if self.calib_epochs > self.epochs:
            raise ValueError(f"schedule.calib_epochs={self.calib_epochs} exceeds schedule.epochs={self.epochs}")
        for m in self.milestones:
            _int_at_least("milestones", m, 1, self.name)
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"schedule.milestones={list(self.milestones)} must be increasing")

    def decay_factor(self, epoch: int, decay: float) -> float:
        """Multi-step decay: decay ** (number of milestones reached by this 0-based epoch)."""
        return decay ** sum(1 for m in self.milestones if epoch >= m)

    def to_dict(self) -> dict:
        return {**asdict(self), "milestones": list(self.milestones)}


def _int_at_least(key: str, value, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"schedule.{key}={value!r} is not valid (schedule {name!r}); use an integer >= {low}")
