"""Method and variant as separate fields, for dfqbench's run names and for the papers' reported rows.

A variant is what a run or a paper row adds to, or changes in, a base method: AIT on top of Qimera is method
`qimera`, variant `ait`; the calibration-source study is method `crossdomain`, variant `procedural`.
"""

from __future__ import annotations

import re

# Methods that are published as add-ons to another method: "<base>_<addon>" names the pair.
ADDONS = ("ait", "aac_abn", "recon")
# dfqbench names that are not "<base>_<addon>" or "<base>-<variant>" (conf/method/ait.yaml is GDFQ + AIT).
_RUN_NAMES = {"ait": ("gdfq", "ait")}
# A dfqbench run whose method is not a reproduction says so beside its name in every table (the record's
# `fidelity`, from the method yaml's `source:` block; dfqbench.methods.base.FIDELITIES).
FIDELITY_LABELS = {"reconstruction": " (reconstruction from the abstract, not a reproduction)",
                   "unofficial-code": " (from unofficial code)"}
# Papers that name one method twice (AIT calls AutoReCon "ARC"; dfqbench's config is `arc`).
_ALIASES = {"autorecon": "arc"}
# What a method key stands for where the key alone does not say (the transformer methods and the calibration
# baselines run beside them): each teacher's section in baselines.md and README.md lists the labels of the methods
# its rows use (`legend`). The Method column keeps the key.
METHOD_LABELS = {
    "psaqvit": "PSAQ-ViT (ECCV 2022): patch-similarity-entropy image synthesis, then min/max calibration",
    "psaqvit2": "PSAQ-ViT V2 (TNNLS 2024): PSAQ-ViT with an adaptive teacher-student stage (code not released)",
    "gaussian_calib": "Gaussian-noise calibration, PSAQ-ViT's data-free baseline (32 images from N(0, 1))",
    "minmax_calib": "min/max calibration on the variant's images (variant `real`: training images, NOT data-free)",
    "percentile_calib": "percentile calibration (the percentile range estimator instead of min/max) on the "
                        "variant's images (variant `real`: training images, NOT data-free)",
}
# What a training schedule's numbers are, printed under each table of that schedule (conf/schedule/<name>.yaml
# has the budget and why; docs/results.md the reading). A schedule not listed gets no line.
SCHEDULE_NOTES = {
    "cpu": "a smoke budget: 600 iterations of batch 64, 0.75 % of the papers' 80,000 at batch 200. At it GDFQ "
           "and Qimera end near where calibration put their students, and the family's ranking follows each "
           "loss's effective step size more than the method. Its tiers are those of the 4x longer cpu_long, "
           "but the order inside a tier changes with the seed (docs/results.md, results/ranking.md); "
           "`schedule=paper` (GPU) is the papers' budget.",
    "cpu_long": "the cpu schedule's warm-up with 6x its student steps (2,400 iterations of batch 64, 3 % of "
                "the papers' 80,000 at batch 200): a longer CPU probe of whether the cpu ranking holds. It sorts "
                "the family into the same tiers as cpu (results/ranking.md, docs/results.md); it is not the "
                "papers' budget.",
    "smoke": "a few iterations for the tests (2 epochs x 2 iterations of batch 16), not a baseline.",
    "quick": "a minutes-long end-to-end check (30 iterations of batch 32), not a baseline.",
    "paper_first10": "the paper schedule's first 10 of 400 epochs (2,000 iterations of batch 200): a longer "
                     "probe, not the papers' budget.",
}


def schedule_note(schedule: str) -> list[str]:
    """The line (and a blank) under a table of this schedule, or nothing for a schedule without a note."""
    return [f"Schedule `{schedule}`: {SCHEDULE_NOTES[schedule]}", ""] if schedule in SCHEDULE_NOTES else []


# Section titles of teachers that no paper reports on (a paper's rows carry their own table title, which wins).
TEACHER_TITLES = {("vit_cifar10", "cifar10"): "ViT (CIFAR-10, transformer teacher trained here)"}


def key(label: str) -> str:
    """'GDFQ' -> 'gdfq', 'AAC+ABN' -> 'aac_abn' (dfqbench.reported.method_key's rule)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def split_run_method(name: str) -> tuple[str, str]:
    """A record's `method` (the config's `name:`) -> (method, variant): 'qimera_ait' -> ('qimera', 'ait'),
    'ait' -> ('gdfq', 'ait'), 'crossdomain-real' -> ('crossdomain', 'real'), 'zeroq' -> ('zeroq', '')."""
    if name in _RUN_NAMES:
        return _RUN_NAMES[name]
    if "-" in name:
        base, variant = name.split("-", 1)
        return _ALIASES.get(base, base), variant
    for addon in ADDONS:
        if name.endswith("_" + addon) and len(name) > len(addon) + 1:
            return _ALIASES.get(name[: -len(addon) - 1], name[: -len(addon) - 1]), addon
    return _ALIASES.get(name, name), ""


def split_reported(method: str, notes: str) -> tuple[str, str]:
    """A reported row's (method, notes) -> (method, variant). The seed files AIT's "Qimera + AIT" rows under
    `ait` and ACQ's "ACQ + AIT" under `acq`: a note "A + B" where A or B is the row's method (or A_B is) makes the
    row method A, variant B. Notes such as "OCS + Best Clip" (B is no method) leave the row as it is."""
    method = _ALIASES.get(method, method)
    head = re.split(r"\s[(;]", str(notes), maxsplit=1)[0].strip()
    parts = head.split(" + ")
    if len(parts) == 2:
        base, addon = (_ALIASES.get(key(p), key(p)) for p in parts)
        if addon in ADDONS and method in (base, addon, f"{base}_{addon}"):
            return base, addon
    if method in _RUN_NAMES:  # a reported row named like one of our configs
        return _RUN_NAMES[method]
    return split_run_method(method)


def display(method: str, variant: str) -> str:
    """'qimera', 'ait' -> 'qimera + ait'; 'crossdomain', 'real' -> 'crossdomain-real'."""
    if not variant:
        return method
    return f"{method} + {variant}" if variant in ADDONS else f"{method}-{variant}"


def legend(methods) -> str:
    """'Methods: `psaqvit` = PSAQ-ViT (...); ...' for the labelled methods among `methods`, sorted ("" if none)."""
    named = sorted({m for m in methods if m in METHOD_LABELS})
    return ("Methods: " + "; ".join(f"`{m}` = {METHOD_LABELS[m]}" for m in named) + ".") if named else ""
