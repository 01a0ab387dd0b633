"""Parity driver for Q-ASR's synthesis: the official get_synthetic_data (kssteven418/Q-ASR,
nemo/quantization/utils/distill_data.py, as examples/asr/quantization/synthesize.py calls it) on the dfqbench
stand-in teacher (model=seq_conv1d_cifar10), beside `python -m dfqbench method=qasr quant=qasr` on the same cells.

    git clone /work/.mirror/kssteven418+Q-ASR/repo /tmp/qasr-official
    python scripts/parity/qasr.py --official /tmp/qasr-official [--bits w6a6 w4a4 | --wbit 6 --abit 6]
        [--seeds 0 1 2] [--dfqbench] [--resume]

Only the synthesis is compared: Q-ASR's quantizer lives in the NeMo fork (QuantAct, QuantConv1d inside QuartzNet's
MaskedConv1d) and cannot run on a non-NeMo model, so every official batch set is handed to dfqbench's own Q-ASR
quantizer and calibration (method=qasr's `quantize` with `quant=qasr`: BN folded, EMA of the per-batch percentile
ranges) and scored on the full test set. The two sides of a cell therefore differ only in the synthesis code.

The official side runs in a child process per seed (global state: the seed, the patched module):
`torch.manual_seed(S)`, then the clone's `get_synthetic_data(encoder, decoder, batch_size, dim, seqlen,
train_iter, num_batch, lr)` with synthesize.py's call (`dim` its 64 mel features) and the budget of
conf/method/qasr.yaml (8 x 50 batches, 200 iterations, lr 0.01 = synthesize.py's defaults). distill_data.py is
loaded from its file as a module of its own (not through the `nemo` package, whose __init__ needs all of NeMo; the
file itself imports torch, tqdm and the standard library only: any `nemo` import it has is stubbed and listed).
Run-time patches, each recorded in the run's "patches":
  Q1 the encoder (NeMo's QuartzNet encoder, `teacher_model`) -> the dfqbench teacher in a wrapper: forward(x,
     length) hands the (B, 96, 32) sequence to the teacher as the (B, 3, 32, 32) image its ColumnsAsSequence
     flattens back into that same sequence (a reshape: the identical tensor), returns (logits, length, None);
     `convs_before_bn` = each Conv1d whose output is the next BatchNorm1d's input (found by a forward pass);
  Q2 the decoder (`teacher_model_decoder`) -> the identity on encoder_output (the code computes a log-prob term
     from it that the loss does not use);
  Q3 the conv-output hook class keeps `(output,)`: NeMo's MaskedConv1d returns (out, lens, scaling factor) and the
     code reads `conv_output[0]`; a plain Conv1d returns the tensor itself;
  Q4 dim 64 -> 96, seqlen 500 -> 32: the stand-in's sequence (3 x 32 pixel rows as features, 32 columns as steps);
  Q5 the noise DataLoader: num_workers 32 -> 0 after torch.manual_seed(S) (the code seeds nothing; with 32 workers
     the noise would come from their own seeds); the loader also keeps each batch's initial tensor (no RNG drawn);
  Q6 ReduceLROnPlateau(..., verbose=True): the argument dropped (torch >= 2.7 has none; it only printed), and each
     scheduler records the loss values it is stepped with (one list per batch; no RNG, no arithmetic);
  Q7 .cuda() -> the CPU;
  Q8 (only when the file calls `_kl_loss` but defines only `kl_loss`, as one published version does: a NameError at
     the first iteration) `_kl_loss` = the file's own `kl_loss`.
The code's constants (initial noise U(-a, a), patience, min_lr, eps, lr) and synthesize.py's defaults are read from
the clone's text and set beside conf/method/qasr.yaml ("settings_check"): a difference there is a deviation.

Loss check (--loss-check-batches K, default 2): the first K official batches' initial tensors are also optimized
by dfqbench's own loop (dfqbench.synth.bn_kl / bn_loop: the same Adam and plateau settings) from the identical
tensor; the record holds both loss trajectories (max relative difference), the final images' max difference and
the BN-KL of both final images under both codes (the official loss of a tensor: one official iteration on it,
the value its scheduler is stepped with), and dfqbench's loss on every final official batch.

Writes results/parity/qasr/[<tag>/]w<W>a<A>/: official-s<S>.json and official-s<S>.log.txt per seed, official.json;
with --dfqbench dfqbench-qasr-s<S>.record.json, dfqbench.log.txt, dfqbench.json and the results/parity.csv row
(--csv). --resume keeps finished seeds of both sides (same settings and commit; same dfqbench overrides).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import random
import re
import shutil
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_REPO = "kssteven418/Q-ASR"
EXPECTED_COMMIT = "aa1ec2ef78fd7606f8f365dfe3e66691a0e48178"
DISTILL = "nemo/quantization/utils/distill_data.py"
SYNTHESIZE = "examples/asr/quantization/synthesize.py"
OUT = common.REPO / "results" / "parity" / "qasr"
METHOD = QUANT = "qasr"
SWEEPS = common.REPO / "results" / "sweeps"
_FRESH_S: dict = {}  # seed -> seconds of a dfqbench run that synthesized its batches (any cell)
QUANT_NOTE = ("dfqbench quant=qasr on both sides (BN folded, symmetric per-channel weights on Q-ASR's grid, "
              "symmetric per-tensor activations at every layer input and the model input, percentile 99.996, "
              "EMA 0.95 of the per-batch ranges)")


# --- pure helpers ---------------------------------------------------------------------------------------------

def parse_bits(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected w<W>a<A>, e.g. w6a6")
    return int(m.group(1)), int(m.group(2))


def sequence_shape(input_shape) -> tuple[int, int]:
    """(features, steps) of the sequence the stand-in reads from an image [C, H, W]: ColumnsAsSequence flattens
    channels and rows into C * H features, the W columns are the steps."""
    c, h, w = (int(v) for v in input_shape)
    return c * h, w


def conv_bn_pairs(model, input_shape) -> list:
    """(conv, bn) for every BatchNorm1d whose input is a Conv1d's output, in execution order (one forward of a
    zero batch): the stand-in's `convs_before_bn`. A BatchNorm1d fed by anything else is an error."""
    import torch
    from torch import nn

    outputs, pairs, orphans, handles = {}, [], [], []

    def keep_output(module, args, out):
        outputs[id(out)] = module

    def pair(module, args):
        conv = outputs.get(id(args[0]))
        (pairs if conv is not None else orphans).append((conv, module) if conv is not None else module)

    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            handles.append(m.register_forward_hook(keep_output))
        elif isinstance(m, nn.BatchNorm1d):
            handles.append(m.register_forward_pre_hook(pair))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if orphans or not pairs:
        raise ValueError(f"{len(orphans)} BatchNorm1d layer(s) not fed by a Conv1d ({len(pairs)} pairs): Q-ASR's "
                         f"synthesis hooks the conv right before each BatchNorm1d")
    return pairs


_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def official_constants(distill_source: str) -> dict:
    """The settings get_synthetic_data hard-codes, read from distill_data.py's text: the initial noise
    `torch.rand(size) * s - o` (U(-o, s - o)), the plateau's patience and min_lr, eps and the default lr. A value
    not found is None (the run records it; a changed file is then read by hand)."""
    out = {}
    m = re.search(r"torch\.rand\(\s*self\.size\s*\)\s*\*\s*" + _NUM + r"\s*-\s*" + _NUM, distill_source)
    out["init_low_high"] = [-float(m.group(2)), float(m.group(1)) - float(m.group(2))] if m else None
    body = distill_source.split("def get_synthetic_data", 1)[-1] if "def get_synthetic_data" in distill_source else ""
    for key, pattern in (("patience", r"patience\s*=\s*" + _NUM), ("min_lr", r"min_lr\s*=\s*" + _NUM),
                         ("eps", r"\beps\s*=\s*" + _NUM), ("default_lr", r"\blr\s*=\s*" + _NUM)):
        m = re.search(pattern, body)
        out[key] = float(m.group(1)) if m else None
    if out["patience"] is not None:
        out["patience"] = int(out["patience"])
    out["unbiased_var"] = bool(re.search(r"torch\.var\(", body)) and "unbiased=False" not in body
    return out


def synthesize_defaults(synthesize_source: str) -> dict:
    """synthesize.py's argparse defaults (num_batch, batch_size, seqlen, train_iter, lr) and the `dim` it passes."""
    out = {}
    for m in re.finditer(r"add_argument\(\s*[\"']--(\w+)[\"']\s*,\s*type\s*=\s*(int|float)\s*,\s*default\s*=\s*"
                         + _NUM, synthesize_source):
        out[m.group(1)] = (int if m.group(2) == "int" else float)(m.group(3))
    m = re.search(r"get_synthetic_data\([^)]*?\bdim\s*=\s*(\d+)", synthesize_source, re.S)
    if m:
        out["dim"] = int(m.group(1))
    return out


def settings_check(constants: dict, defaults: dict, s) -> dict:
    """Official values beside dfqbench's QASRSettings `s`: {name: [official, dfqbench, same]}."""
    rows = {
        "init_range": (constants.get("init_low_high"), [-s.init_range, s.init_range]),
        "patience": (constants.get("patience"), s.patience),
        "min_lr": (constants.get("min_lr"), s.min_lr),
        "eps": (constants.get("eps"), 1e-6),
        "lr (synthesize.py)": (defaults.get("lr"), s.lr),
        "batch_size (synthesize.py)": (defaults.get("batch_size"), s.batch_size),
        "num_batch (synthesize.py)": (defaults.get("num_batch"), s.num_batches),
        "train_iter (synthesize.py)": (defaults.get("train_iter"), s.iterations),
    }

    def same(a, b):
        if a is None:
            return None
        if isinstance(a, list):
            return all(abs(x - y) <= 1e-12 for x, y in zip(a, b))
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))

    return {k: [a, b, same(a, b)] for k, (a, b) in rows.items()}


class _NemoStubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for `nemo`, `nemo.*` while distill_data.py is imported (it needs none of NeMo)."""

    def __init__(self):
        self.names: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "nemo" or name.startswith("nemo."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        self.names.append(spec.name)
        return mod

    def exec_module(self, module):
        pass


def load_official(root: Path):
    """distill_data.py of the clone at `root` as a module of its own: (module, its text, stubbed nemo names)."""
    path = Path(root) / DISTILL
    source = path.read_text()
    stubs = _NemoStubs()
    sys.meta_path.insert(0, stubs)
    saved = {k: v for k, v in sys.modules.items() if k == "nemo" or k.startswith("nemo.")}
    try:
        spec = importlib.util.spec_from_file_location("qasr_official_distill_data", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.meta_path.remove(stubs)
        for k in [k for k in sys.modules if k == "nemo" or k.startswith("nemo.")]:
            if k not in saved:
                del sys.modules[k]
    if not hasattr(mod, "get_synthetic_data"):
        raise SystemExit(f"{path}: no get_synthetic_data (an older commit names it get_distill_data, with other "
                         f"loss options): not the code this driver was written for ({DEFAULT_REPO}@"
                         f"{EXPECTED_COMMIT[:7]})")
    return mod, source, stubs.names


def _line_of(source: str, needle: str) -> int | None:
    i = source.find(needle)
    return None if i < 0 else source[:i].count("\n") + 1


class _Namespace:
    """A module stand-in: the given attributes, everything else from `base`."""

    def __init__(self, base, **attrs):
        self._base = base
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        return getattr(self._base, name)


class OfficialSynthesis:
    """The official module patched to run on a dfqbench image teacher (Q1-Q8 above). `run()` is one call of its
    get_synthetic_data; `loss_of(x)` the official loss of a tensor (one official iteration on a copy)."""

    def __init__(self, mod, source: str, teacher, input_shape, device="cpu"):
        import torch
        from torch import nn

        self.mod, self.source, self.device = mod, source, torch.device(device)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.dim, self.seqlen = sequence_shape(self.input_shape)
        self.feed = None  # tensors the noise loader yields instead of its own (loss_of)
        self.initial: list = []  # each batch's tensor as the loader yielded it
        self.losses: list[list[float]] = []  # per scheduler (= per batch): the losses it was stepped with
        self.patches: list[str] = []
        run = self
        pairs = conv_bn_pairs(teacher, self.input_shape)
        shape = self.input_shape

        class StandInEncoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.teacher = teacher
                self.convs_before_bn = pairs

            def forward(self, x, length=None):
                return self.teacher(x.reshape(x.shape[0], *shape)), length, None

        self.encoder = StandInEncoder()
        self.patches.append(
            f"Q1 encoder -> the dfqbench teacher: forward(x, length) = teacher(x.reshape(B, "
            f"{', '.join(map(str, shape))})) (its ColumnsAsSequence flattens it back to the same (B, {self.dim}, "
            f"{self.seqlen}) sequence), returns (logits, length, None); convs_before_bn = {len(pairs)} (Conv1d, "
            f"BatchNorm1d) pairs")

        def decoder(encoder_output=None, encoder_output_scaling_factor=None, **kwargs):
            return encoder_output

        self.decoder = decoder
        self.patches.append("Q2 decoder -> identity on encoder_output (feeds only the unused log-prob term)")

        hook_names = [n for n in ("OutputHook", "output_hook") if isinstance(getattr(mod, n, None), type)]
        if not hook_names:
            raise SystemExit("distill_data.py: no OutputHook / output_hook class to patch (Q3)")
        for name in hook_names:  # the method is wrapped in place: the class's own `super(OutputHook, self)`
            cls = getattr(mod, name)  # calls would recurse into a subclass bound to the same name
            original = cls.hook

            def hook(self, module, inputs, output, _original=original):
                return _original(self, module, inputs, output if isinstance(output, tuple) else (output,))

            cls.hook = hook
        self.patches.append(f"Q3 {'/'.join(hook_names)}.hook keeps (output,): a plain Conv1d returns the tensor, "
                            f"NeMo's MaskedConv1d (out, lens, scaling factor); the code reads conv_output[0]")
        self.patches.append(f"Q4 dim 64 -> {self.dim}, seqlen 500 -> {self.seqlen} (the stand-in's sequence: "
                            f"{shape[0]} x {shape[1]} rows as features, {shape[2]} columns as steps)")

        loader_cls = torch.utils.data.DataLoader

        class Loader:
            def __init__(self, dataset, batch_size=1, shuffle=False, num_workers=0, **kwargs):
                self.inner = loader_cls(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, **kwargs)

            def __len__(self):
                return len(self.inner)

            def __iter__(self):
                if run.feed is not None:
                    for x in run.feed:
                        yield x.detach().clone()
                    return
                for x in self.inner:
                    run.initial.append(x.detach().clone())
                    yield x

        if "DataLoader" not in vars(mod):
            raise SystemExit("distill_data.py: no module-level DataLoader to patch (Q5)")
        mod.DataLoader = Loader
        self.patches.append("Q5 the noise DataLoader: num_workers 32 -> 0, after torch.manual_seed(seed) (the code "
                            "seeds nothing); it also keeps each batch's initial tensor")

        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau

        class RecordingPlateau(plateau):
            def __init__(self, optimizer, *args, verbose=None, **kwargs):
                super().__init__(optimizer, *args, **kwargs)
                run.losses.append([])
                self._record = run.losses[-1]

            def step(self, metrics, *args, **kwargs):
                self._record.append(float(metrics))
                return super().step(metrics, *args, **kwargs)

        if isinstance(vars(mod).get("optim"), types.ModuleType):
            mod.optim = _Namespace(torch.optim, lr_scheduler=_Namespace(torch.optim.lr_scheduler,
                                                                        ReduceLROnPlateau=RecordingPlateau))
        else:
            raise SystemExit("distill_data.py: no `optim` module global to patch (Q6)")
        self.patches.append("Q6 ReduceLROnPlateau(..., verbose=True): the argument dropped (torch >= 2.7 has none; it "
                            "only printed); each scheduler records the losses it is stepped with")

        common.cpu_only_cuda_calls(self.device)
        self.patches.append("Q7 .cuda() -> cpu")

        if "_kl_loss(" in source and not hasattr(mod, "_kl_loss") and callable(getattr(mod, "kl_loss", None)):
            mod._kl_loss = mod.kl_loss
            self.patches.append(f"Q8 distill_data.py:{_line_of(source, '_kl_loss(')} calls _kl_loss, the file "
                                f"defines kl_loss only (line {_line_of(source, 'def kl_loss')}): a NameError as "
                                f"published; _kl_loss = the file's kl_loss")

    def run(self, seed: int, batch_size: int, num_batch: int, train_iter: int, lr: float):
        """(final images, initial images, per-batch losses, seconds): one official call, seeded."""
        import torch
        self.feed, self.initial, self.losses = None, [], []
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        out = self.mod.get_synthetic_data(self.encoder, self.decoder, batch_size=batch_size, dim=self.dim,
                                          seqlen=self.seqlen, train_iter=train_iter, num_batch=num_batch, lr=lr)
        seconds = time.perf_counter() - t0
        image = (-1, *self.input_shape)
        finals = [x.detach().reshape(image).clone() for x in out]
        initial = [x.reshape(image) for x in self.initial[:num_batch]]  # the loop draws one batch more, then stops
        return finals, initial, [list(v) for v in self.losses], seconds

    def loss_of(self, x, lr: float = 0.01) -> float:
        """The official loss of images `x` [B, C, H, W]: the value its scheduler is stepped with at iteration 0."""
        self.feed, self.losses = [x.detach().reshape(x.shape[0], self.dim, self.seqlen)], []
        try:
            self.mod.get_synthetic_data(self.encoder, self.decoder, batch_size=x.shape[0], dim=self.dim,
                                        seqlen=self.seqlen, train_iter=1, num_batch=1, lr=lr)
        finally:
            self.feed = None
        return self.losses[0][0]


def dfqbench_loss(model, x) -> float:
    """dfqbench's Q-ASR loss (synth.bn_kl.bn_kl_loss over the BN inputs) of images `x`."""
    import torch

    from dfqbench.synth.bn_kl import bn_kl_loss
    from dfqbench.synth.bn_loop import BNTaps, bn_layers
    model.eval()
    with BNTaps(bn_layers(model, "Q-ASR")) as taps, torch.no_grad():
        model(x)
        return float(bn_kl_loss(taps.pairs()))


def dfqbench_from_initial(model, initial: list, settings, device="cpu"):
    """dfqbench's own synthesis loop (bn_loop.synthesize_batches with QASRSynthesis' loss and batch settings)
    started from the given tensors instead of its generator's noise: (final images, per-batch losses)."""
    import torch

    from dfqbench.synth.bn_kl import QASRSynthesis
    from dfqbench.synth.bn_loop import ImageBatch, synthesize_batches

    losses: list[list[float]] = []

    class RecordingBatch(ImageBatch):
        def step(self, index, loss):
            self.record.append(float(loss))
            super().step(index, loss)

    class FromInitial(QASRSynthesis):
        def new_batch(self, index):
            s = self.settings
            batch = RecordingBatch(initial[index].detach().clone().to(self.device), s.lr, s.patience, s.min_lr,
                                   channels_last=len(self.input_shape) == 3)  # as QASRSynthesis.new_batch
            batch.record = []
            losses.append(batch.record)
            return batch

    s = dataclasses.replace(settings, num_batches=len(initial), batch_size=int(initial[0].shape[0]))
    synth = FromInitial(tuple(initial[0].shape[1:]), s, torch.Generator().manual_seed(0), torch.device(device))
    finals = synthesize_batches(model, synth, torch.device(device))
    return [f.detach().clone() for f in finals], losses


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=0.0)


def batches_sha256(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --- child: one seed of the official synthesis, dfqbench's quantizer on its batches ---------------------------

def dfqbench_overrides(a, wbit: int, abit: int, seed: int) -> list[str]:
    over = [f"method={METHOD}", f"quant={QUANT}", f"wbit={wbit}", f"abit={abit}", f"seed={seed}",
            f"threads={a.threads}"]
    for key in ("batch_size", "num_batches", "iterations"):
        if getattr(a, key) is not None:
            over.append(f"method.{key}={getattr(a, key)}")
    return over + common.teacher_overrides(a)


def quantize_on(batches, a, wbit, abit, seed, model, data) -> dict:
    """method=qasr's quantize (quant=qasr, dfqbench's convention and calibration) on `batches` instead of its own
    synthetic data, then the test set: what a dfqbench run does after its synthesis."""
    import torch

    from dfqbench.evaluate import evaluate
    from dfqbench.methods.base import QuantContext
    from dfqbench.quant.kernels.backend import resolve_backend_name, use_backend
    from dfqbench.runner import build_convention, build_method, data_shape

    cfg = common.compose(dfqbench_overrides(a, wbit, abit, seed))
    method = build_method(cfg)
    conv = build_convention(cfg, method)
    if conv.layers.input_abit and conv.layers.input_range == "pixels":
        mean, std = data.mean.flatten(), data.std.flatten()
        conv.pixel_range = (((0 - mean) / std).tolist(), ((1 - mean) / std).tolist())
    device = torch.device("cpu")
    ctx = QuantContext(conv, wbit, abit, seed, device, tuple(data_shape(data, cfg)), cfg.dataset.num_classes, False,
                       mean=data.mean.flatten(), std=data.std.flatten())
    method.calibration_data = lambda m, c: [b.contiguous(memory_format=torch.channels_last) for b in batches]
    random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with use_backend(resolve_backend_name(conv.backend, device)):
        qmodel = method.quantize(copy.deepcopy(model), ctx)
        calib_s = time.perf_counter() - t0
        result = evaluate(qmodel.to(memory_format=torch.channels_last), data, cfg.eval.batch_size, device)
    return {"top1": round(result["top1"], 4), "top5": round(result["top5"], 4), "calib_s": round(calib_s, 3),
            "eval_batch_size": int(cfg.eval.batch_size), "convention": conv.name}


def loss_check(official: OfficialSynthesis, teacher, finals, initial, losses, settings, k: int) -> dict:
    model = copy.deepcopy(teacher).eval()
    k = min(k, len(initial))
    ours, our_losses = dfqbench_from_initial(model, initial[:k], settings)
    rows = []
    for i in range(k):
        o, d = finals[i], ours[i]
        rows.append({
            "batch": i, "iterations": len(losses[i]),
            "initial_loss_official": losses[i][0], "initial_loss_dfqbench": our_losses[i][0],
            "last_step_loss_official": losses[i][-1], "last_step_loss_dfqbench": our_losses[i][-1],
            "trajectory_max_rel_diff": max_rel_diff(losses[i], our_losses[i]),
            "final_images_max_abs_diff": float((o - d).abs().max()),
            "final_loss": {"official_code_on_official_batch": official.loss_of(o, settings.lr),
                           "dfqbench_code_on_official_batch": dfqbench_loss(model, o),
                           "official_code_on_dfqbench_batch": official.loss_of(d, settings.lr),
                           "dfqbench_code_on_dfqbench_batch": dfqbench_loss(model, d)},
        })
    for r in rows:
        f = r["final_loss"]
        r["final_loss_code_rel_diff"] = max(
            abs(f["official_code_on_official_batch"] - f["dfqbench_code_on_official_batch"])
            / max(abs(f["official_code_on_official_batch"]), 1e-12),
            abs(f["official_code_on_dfqbench_batch"] - f["dfqbench_code_on_dfqbench_batch"])
            / max(abs(f["official_code_on_dfqbench_batch"]), 1e-12))
    on_official = [dfqbench_loss(model, x) for x in finals]
    return {"batches": rows,
            "trajectory_max_rel_diff": max(r["trajectory_max_rel_diff"] for r in rows),
            "final_images_max_abs_diff": max(r["final_images_max_abs_diff"] for r in rows),
            "final_loss_code_rel_diff": max(r["final_loss_code_rel_diff"] for r in rows),
            "dfqbench_loss_on_all_official_batches_mean": sum(on_official) / len(on_official),
            "official_last_step_loss_mean": sum(v[-1] for v in losses) / len(losses),
            "official_initial_loss_mean": sum(v[0] for v in losses) / len(losses)}


def qasr_settings(a):
    """dfqbench's QASRSettings for this run: conf/method/qasr.yaml with the driver's budget overrides."""
    from dfqbench.runner import build_method
    cfg = common.compose(dfqbench_overrides(a, 6, 6, 0))
    return build_method(cfg).settings


def child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    from dfqbench.runner import data_shape
    input_shape = tuple(data_shape(data, cfg))
    teacher = loaded.model.eval()
    s = qasr_settings(a)
    root = Path(a.official).resolve()
    mod, source, stubs = load_official(root)
    synth_text = (root / SYNTHESIZE).read_text() if (root / SYNTHESIZE).is_file() else ""
    official = OfficialSynthesis(mod, source, copy.deepcopy(teacher).eval(), input_shape)
    patches = list(official.patches)
    if stubs:
        patches.insert(0, f"Q0 imports stubbed while loading distill_data.py: {', '.join(stubs)}")
    patches.append(f"budget = conf/method/qasr.yaml: batch_size {s.batch_size}, num_batch {s.num_batches}, "
                   f"train_iter {s.iterations}, lr {s.lr:g}")
    check = settings_check(official_constants(source), synthesize_defaults(synth_text), s)
    print("patches:\n  " + "\n  ".join(patches), flush=True)
    finals, initial, losses, synth_s = official.run(a.seed, s.batch_size, s.num_batches, s.iterations, s.lr)
    if len(finals) != s.num_batches or any(len(v) != s.iterations for v in losses):
        raise SystemExit(f"official synthesis gave {len(finals)} batches, {[len(v) for v in losses]} steps")
    result = {"seed": a.seed, "synth_s": round(synth_s, 3),
              "synth_s_per_step": round(synth_s / (s.num_batches * s.iterations), 5),
              "calib_sha256": batches_sha256(finals), "initial_sha256": batches_sha256(initial),
              "patches": patches, "settings_check": check, "qasr_settings": vars(s), "cells": {},
              "device": "cpu", "threads": torch.get_num_threads(), "n_test": data.num_samples,
              "model": str(cfg.model.name), "dataset": str(cfg.dataset.name), "input_shape": list(input_shape),
              "sequence_shape": [official.dim, official.seqlen], "checkpoint_sha256": loaded.sha256}
    model = loaded.model.to(memory_format=torch.channels_last).eval()
    for wbit, abit in a.bits:
        r = quantize_on(finals, a, wbit, abit, a.seed, model, data)
        r["quantize_s"] = round(synth_s + r["calib_s"], 3)
        result["cells"][f"w{wbit}a{abit}"] = r
        print(f"w{wbit}a{abit}: top-1 {r['top1']:.2f} (dfqbench quant={QUANT} on the official batches)", flush=True)
    if a.loss_check_batches:
        try:
            result["loss_check"] = loss_check(official, teacher, finals, initial, losses, s, a.loss_check_batches)
        except Exception as exc:  # the check must not cost the official number
            result["loss_check_error"] = repr(exc)
    print(json.dumps(result))


# --- parent: seeds, cells, records, parity.csv ----------------------------------------------------------------

def settings_of(a, commit: str, wbit: int, abit: int) -> dict:
    """What an official seed's record must match to be kept by --resume."""
    return {"official_commit": commit, "wbit": wbit, "abit": abit, "batch_size": a.batch_size,
            "num_batches": a.num_batches, "iterations": a.iterations, "loss_check_batches": a.loss_check_batches,
            "teacher_overrides": common.teacher_overrides(a)}


def official_side(a, repo: str, commit: str, out: Path) -> dict:
    """{(wbit, abit): [per-seed records]}: kept ones (--resume) or a child per seed for the missing cells."""
    runs = {bits: [] for bits in a.bits}
    printed = False
    for seed in a.seeds:
        missing = []
        for wbit, abit in a.bits:
            kept = out / f"w{wbit}a{abit}" / f"official-s{seed}.json"
            r = json.loads(kept.read_text()) if a.resume and kept.exists() else None
            if r and r.get("settings") == settings_of(a, commit, wbit, abit) and "top1" in r:
                runs[(wbit, abit)].append(r)
                print(f"official Q-ASR synthesis W{wbit}A{abit} seed {seed}: reusing {common.rel(kept)} (top-1 "
                      f"{r['top1']:.2f})", flush=True)
            else:
                missing.append((wbit, abit))
        if not missing:
            continue
        first = out / f"w{missing[0][0]}a{missing[0][1]}"
        args = common.child_args(a, seed) + ["--loss-check-batches", str(a.loss_check_batches),
                                             "--bits", *[f"w{w}a{b}" for w, b in missing]]
        for key in ("batch_size", "num_batches", "iterations"):
            if getattr(a, key) is not None:
                args += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
        env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
        log = first / f"official-s{seed}.log.txt"
        res = common.run_child(Path(__file__), args, log, env)
        if not printed:
            print("official code patches (run time):\n  " + "\n  ".join(res["patches"]), flush=True)
            bad = {k: v for k, v in res["settings_check"].items() if v[2] is False}
            print("settings beside conf/method/qasr.yaml: " + ("all equal" if not bad else f"DIFFER: {bad}"),
                  flush=True)
            printed = True
        lc = res.get("loss_check")
        for wbit, abit in missing:
            cell = out / f"w{wbit}a{abit}"
            cell.mkdir(parents=True, exist_ok=True)
            if cell != first:
                shutil.copy(log, cell / log.name)
            r = {k: v for k, v in res.items() if k != "cells"}
            r.update(res["cells"][f"w{wbit}a{abit}"], wbit=wbit, abit=abit, official_repo=repo,
                     official_commit=commit, settings=settings_of(a, commit, wbit, abit))
            common.write_json(cell / f"official-s{seed}.json", r)
            runs[(wbit, abit)].append(r)
            msg = (f"official Q-ASR synthesis W{wbit}A{abit} seed {seed}: top-1 {r['top1']:.2f} (dfqbench quant="
                   f"{QUANT} on the official batches), synthesis {r['synth_s']:.0f} s ({r['synth_s_per_step']:.3f} "
                   f"s/step)")
            if lc:
                msg += (f"; loss check ({len(lc['batches'])} batch(es) from the same initial tensor): trajectory "
                        f"max rel diff {lc['trajectory_max_rel_diff']:.1e}, final images max diff "
                        f"{lc['final_images_max_abs_diff']:.1e}, final loss code rel diff "
                        f"{lc['final_loss_code_rel_diff']:.1e}")
            if "loss_check_error" in r:
                msg += f"; loss_check_error: {r['loss_check_error']}"
            print(msg, flush=True)
    return runs


def cell_record(a, repo, commit, wbit, abit, runs) -> dict:
    top1 = common.mean_std([r["top1"] for r in runs])
    secs = common.mean_std([r["quantize_s"] for r in runs])
    rec = {"method": METHOD, "official_repo": repo, "official_commit": commit,
           "expected_commit": EXPECTED_COMMIT, "wbit": wbit, "abit": abit, "seeds": [r["seed"] for r in runs],
           "top1_mean": round(top1[0], 4), "top1_std": round(top1[1], 4), "quantize_s_mean": round(secs[0], 3),
           "what": "official get_synthetic_data batches, quantized and calibrated by dfqbench method=qasr quant=qasr",
           "patches": runs[0]["patches"], "settings_check": runs[0]["settings_check"], "runs": runs,
           "model": runs[0]["model"], "dataset": runs[0]["dataset"], "n_test": runs[0]["n_test"],
           "device": runs[0]["device"], "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    checks = [r["loss_check"] for r in runs if "loss_check" in r]
    if checks:
        rec["loss_check"] = {k: max(c[k] for c in checks) for k in
                             ("trajectory_max_rel_diff", "final_images_max_abs_diff", "final_loss_code_rel_diff")}
    return rec


def sweep_top1(a, wbit, abit, seed) -> float | None:
    """The committed sweep record of the same dfqbench cell, when there is one (for reference only)."""
    path = SWEEPS / f"{a.model}-{a.dataset}" / METHOD / QUANT / f"w{wbit}a{abit}-s{seed}" / "record.json"
    try:
        return json.loads(path.read_text()).get("top1")
    except (OSError, ValueError):
        return None


def dfqbench_cell(a, wbit, abit, cell: Path) -> tuple[list[dict], list[dict]]:
    ours = []
    for seed in a.seeds:
        over = dfqbench_overrides(a, wbit, abit, seed)
        dest = cell / f"dfqbench-{QUANT}-s{seed}"
        kept = dest.with_name(dest.name + ".record.json")
        r = common.kept_record(kept, f"dfqbench qasr W{wbit}A{abit} seed {seed}") if a.resume else None
        if r is not None:
            if [o for o in r.get("overrides", []) if o not in ("force=true", "progress=false")] == over:
                ours.append(r)
                print(f"dfqbench qasr W{wbit}A{abit} seed {seed}: reusing {common.rel(kept)} (top-1 {r['top1']:.2f})",
                      flush=True)
                continue
        r = common.run_dfqbench(over, dest, cell / "dfqbench.log.txt")
        ours.append(r)
        info = r.get("info") or {}
        print(f"dfqbench qasr W{wbit}A{abit} seed {seed}: top-1 {r['top1']:.2f}, quantize {r['quantize_time_s']:.1f} s"
              + (" (synthetic batches from the cache)" if info.get("calib_cached") else ""), flush=True)
    fresh = [r for r in ours if not (r.get("info") or {}).get("calib_cached")]
    for seed, r in zip(a.seeds, ours):
        if not (r.get("info") or {}).get("calib_cached"):
            _FRESH_S.setdefault(seed, r["quantize_time_s"])
    return ours, fresh


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of kssteven418/Q-ASR")
    p.add_argument("--wbit", type=int, default=6, help="one cell's weight bits (default 6: the README's W6A6)")
    p.add_argument("--abit", type=int, default=6, help="one cell's activation bits (default 6)")
    p.add_argument("--bits", type=parse_bits, nargs="+", default=None,
                   help="several w<W>a<A> cells at once (each seed synthesized once for all), e.g. w6a6 w4a4; "
                        "replaces --wbit/--abit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds (default 0 1 2)")
    common.add_teacher_arguments(p, model="seq_conv1d_cifar10")
    p.add_argument("--batch-size", type=int, default=None, help="both sides (default: conf/method/qasr.yaml)")
    p.add_argument("--num-batches", type=int, default=None, help="both sides (default: conf/method/qasr.yaml)")
    p.add_argument("--iterations", type=int, default=None, help="both sides (default: conf/method/qasr.yaml)")
    p.add_argument("--loss-check-batches", type=int, default=2,
                   help="official batches also optimized by dfqbench's loop from the same initial tensor (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cells, write parity.csv")
    common.add_output_arguments(p, OUT, reuse_official=False)
    p.add_argument("--resume", action="store_true",
                   help="keep finished seeds: official-s<S>.json with the same settings and commit, "
                        "dfqbench-qasr-s<S>.record.json with the same overrides and dfqbench source")
    common.add_child_arguments(p)
    a = p.parse_args(argv)
    a.bits = a.bits or [(a.wbit, a.abit)]
    if a.child:
        child(a)
        return
    repo, commit = common.clone_identity(Path(a.official), DEFAULT_REPO, DISTILL)
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    print(f"Q-ASR synthesis parity: {repo}@{commit[:10]} from {Path(a.official).resolve()}"
          + ("" if commit == EXPECTED_COMMIT else f" (NOT the commit dfqbench follows, {EXPECTED_COMMIT[:10]})")
          + f"; cells {['w%da%d' % b for b in a.bits]}, seeds {a.seeds}; {a.threads} thread(s); out {out}", flush=True)
    runs = official_side(a, repo, commit, out)
    for wbit, abit in a.bits:
        cell = out / f"w{wbit}a{abit}"
        record = cell_record(a, repo, commit, wbit, abit, runs[(wbit, abit)])
        common.write_json(cell / "official.json", record)
        print(f"official Q-ASR synthesis W{wbit}A{abit}: top-1 {record['top1_mean']:.2f} +- {record['top1_std']:.2f} "
              f"over seeds {record['seeds']}, synthesis + calibration {record['quantize_s_mean']:.0f} s", flush=True)
    if not a.dfqbench:
        return
    for wbit, abit in a.bits:
        cell = out / f"w{wbit}a{abit}"
        official = runs[(wbit, abit)]
        ours, fresh = dfqbench_cell(a, wbit, abit, cell)
        top1 = common.mean_std([r["top1"] for r in official])
        secs = common.mean_std([r["quantize_s"] for r in official])
        d_top1 = common.mean_std([r["top1"] for r in ours])
        borrowed = [s for s, r in zip(a.seeds, ours) if (r.get("info") or {}).get("calib_cached") and s in _FRESH_S]
        timed = [r["quantize_time_s"] for r in fresh] + [_FRESH_S[s] for s in borrowed]
        d_secs = common.mean_std(timed)
        common.write_json(cell / "dfqbench.json", {
            "method": METHOD, "quant": QUANT, "wbit": wbit, "abit": abit, "seeds": a.seeds,
            "top1_mean": round(d_top1[0], 4), "top1_std": round(d_top1[1], 4),
            "quantize_s_mean": round(d_secs[0], 3) if timed else None, "fresh_seeds": len(fresh),
            "timed_seeds": len(timed),
            "runs": [{"seed": s, "top1": r["top1"], "quantize_time_s": r["quantize_time_s"],
                      "synthesis_time_s": (r.get("info") or {}).get("synthesis_time_s"),
                      "calib_cached": bool((r.get("info") or {}).get("calib_cached")),
                      "committed_sweep_top1": sweep_top1(a, wbit, abit, s),
                      "record": common.rel(cell / f"dfqbench-{QUANT}-s{s}.record.json"),
                      "overrides": dfqbench_overrides(a, wbit, abit, s)} for s, r in zip(a.seeds, ours)],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        print(f"dfqbench method={METHOD} quant={QUANT} W{wbit}A{abit}: top-1 {d_top1[0]:.2f} +- {d_top1[1]:.2f}, "
              f"quantize {common.fmt(d_secs[0], 1) or '(all cached)'} s; official synthesis {top1[0]:.2f} +- "
              f"{top1[1]:.2f}, {secs[0]:.1f} s", flush=True)
        rec = cell_record(a, repo, commit, wbit, abit, official)
        lc = rec.get("loss_check")
        loss_note = (f"loss check from the same initial tensors: trajectory max rel diff "
                     f"{lc['trajectory_max_rel_diff']:.1e}, final BN-KL of both codes on both final batches max rel "
                     f"diff {lc['final_loss_code_rel_diff']:.1e}; " if lc else "")
        patched = "; ".join(x.split(" ")[0] for x in official[0]["patches"] if re.match(r"Q\d", x))
        common.write_row(
            a.csv, method=METHOD, quant=QUANT, wbit=wbit, abit=abit, n_seeds=len(a.seeds), official=(top1, secs),
            dfqbench=(d_top1, d_secs), repo=repo, commit=commit, run=official[0],
            note=f"synthesis only: the official get_synthetic_data (distill_data.py) batches quantized by "
                 f"dfqbench's method=qasr calibration; {QUANT_NOTE}; patched at run time ({patched}): encoder -> "
                 f"the stand-in teacher, decoder -> identity, conv hook output as NeMo's tuple, dim/seqlen "
                 f"64/500 -> 96/32, noise loader num_workers 0 after manual_seed, ReduceLROnPlateau without "
                 f"verbose, cuda -> cpu; budget = conf/method/qasr.yaml; {loss_note}seeds "
                 f"{' '.join(map(str, a.seeds))}; seconds = synthesis + calibration (dfqbench: {len(timed)} "
                 f"seed(s) timed, {len(borrowed)} by the same seed's run in another cell); {official[0]['n_test']} "
                 f"test images; records {common.rel(cell)}")


if __name__ == "__main__":
    main()
