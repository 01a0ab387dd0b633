"""Parity driver for PSAQ-ViT: the official code (zkkli/PSAQ-ViT, test_quant.py + generate_data.py) on the dfqbench
ViT teacher and test set, beside `python -m dfqbench method=psaqvit|gaussian_calib quant=psaqvit` on the same cells.

    git clone /work/.mirror/zkkli+PSAQ-ViT/repo /tmp/psaqvit-official
    python scripts/parity/psaqvit.py --official /tmp/psaqvit-official [--modes 0 1] [--bits w4a8 w8a8 w4a4]
        [--seeds 0 1 2] [--dfqbench] [--resume]

The official side runs the clone's own test_quant.py (`--model deit_tiny --mode M --w_bit W --a_bit A --seed S
--calib-batchsize 32 --val-batchsize 200 --device cpu --num-workers 0`) in a child process per (mode, bits, seed):
seed(), the quantized VisionTransformer (models/vit_quant.py), the calibration batch (mode 0: generate_data(), one
batch of 32 images, 2 x 500 Adam steps on the FP teacher of utils/build_model.py; mode 1: torch.randn), one float
forward of it (running min/max of every QuantAct), model_quant(), model_freeze(), validate(). `--model deit_tiny`
only selects the code's ViT branch (hooks on blocks[i].attn.matmul2, lr 0.20); both networks are the dfqbench teacher.

Nothing of the clone is copied into this repository: each child copies the user's clone into a temporary folder,
applies the edits below to that copy's text (each found the stated number of times, else the run stops), prints
them, runs it and deletes it. The edits (all recorded in official.json "patches"):
  utils/build_model.py
    B1 attention_forward(self, x) -> (self, x, attn_mask=None, is_causal=False), asserting no mask: timm >= 1.0's
       Block calls self.attn(x, attn_mask=...);
    B2 timm.create_model(name, pretrained=True) -> `name` itself when it is a module (the dfqbench teacher);
    B3 net.cuda() -> the run's device.
  generate_data.py
    G1 build_model(model_zoo[args.model]) -> build_model(<a copy of the dfqbench teacher>);
    G2 torch.randn((B, 3, 224, 224)).cuda() -> (B, 3, 32, 32) on the run's device;
    G3 random labels randint(0, 999) -> randint(0, num_classes - 1); .to('cuda') -> the device;
    G4 the KDE grid's .cuda() -> the device;
    G5 clip(): the ImageNet mean/std -> the dfqbench data set's normalization (the clamp stays the [0, 1] pixel box);
    S1 (32x32 scaling, dfqbench's conf/method/psaqvit.yaml) jitter limits 15 / 30 -> --jitter (default 2 / 4);
    S2 (32x32 scaling) TV target random.uniform(2500, 3000) -> --tv-target (default 357 / 429);
    S3 (only with --iterations N != 500) iterations_per_layer = 500 -> N (both epochs);
    P1 (--fast-cosine, default on; --no-fast-cosine runs the official op) the broadcast
       torch.cosine_similarity(p.unsqueeze(1), p.unsqueeze(2), dim=3) -> F.normalize(p) @ F.normalize(p)^T: the
       same similarities (the child measures the difference of values and image gradients on its own batch,
       "cosine_check"), ~4 s per step less on one CPU thread.
  test_quant.py
    T1 str2model(args.model)(pretrained=True, cfg=cfg) -> the code's own VisionTransformer (models/vit_quant.py)
       with the teacher's configuration (img 32, patch 4, width 128, depth 6, 4 heads, MLP ratio 2, qkv bias,
       input_quant=True), loaded from the dfqbench checkpoint with strict=False as the code loads DeiT (the child
       asserts that only the QuantAct x_min/x_max buffers are missing and that, unquantized, it computes the
       teacher's logits);
    T2 build_dataset(args) (ImageNet folders) -> the dfqbench test set (same images, normalization and order as a
       dfqbench run), batches of --val-batchsize;
    T3 mode 1's torch.randn((B, 3, 224, 224)) -> (B, 3, 32, 32);
    I1-I3 instrumentation only (no RNG drawn, nothing computed): time marks before calibration/model_quant and a
       call after validate() that hands back the top-1, the quantized model and the calibration batch.
The official RNG stream is the code's own (seed(S): python random for labels, TV target and jitter; torch for the
images); dfqbench draws from its own generator: the two sides agree in distribution over seeds, not image by image.

With --compare (default on) the child also, after the official number is taken: (a) quantizes the teacher with
dfqbench quant=psaqvit, calibrates it (observe=float) on the *official* calibration batch, and compares weights
(count differing by more than half a step), activation quantizers (count, ranges matched in forward order) and
top-1 on the same test set: the quantizer side checked apart from the synthesis; (b) mode 0: evaluates the official
loss terms (entropy over the matmul2 hooks with the official cosine, CE, TV) and dfqbench's
(dfqbench.synth.patch_similarity) on the official batch, values and image gradients.

Writes results/parity/psaqvit/[<tag>/]<method>-w<W>a<A>/ (method psaqvit for mode 0, gaussian_calib for mode 1):
official-s<S>.json and .log.txt per seed, official.json; with --dfqbench dfqbench-psaqvit-s<S>.record.json,
dfqbench.log.txt, dfqbench.json and the results/parity.csv row (--csv). --resume keeps finished seeds of both sides.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_REPO = "zkkli/PSAQ-ViT"
OUT = common.REPO / "results" / "parity" / "psaqvit"
MODES = {0: "psaqvit", 1: "gaussian_calib"}  # test_quant.py --mode -> the dfqbench method of the same cell
MODE_NAMES = {0: "PSAQ-ViT", 1: "Gaussian noise"}
OFFICIAL_ITERATIONS, OFFICIAL_JITTER, OFFICIAL_TV = 500, (15, 30), (2500, 3000)
QUANT = "psaqvit"
_PRINTED_PATCHES: list = []
_FRESH_S: dict = {}  # (mode, seed) -> seconds of a dfqbench run that made its calibration images (any bit-widths)
QUANT_NOTE = ("dfqbench quant=psaqvit (PSAQ-ViT/FQ-ViT placement: weights symmetric per channel amax/((2^b-1)/2), "
              "activations asymmetric per tensor min/max on the op outputs, softmax float)")


# --- the edits to the temporary copy --------------------------------------------------------------------------

class Edit:
    def __init__(self, label: str, path: str, old: str, new: str, why: str, count: int = 1):
        self.label, self.path, self.old, self.new, self.why, self.count = label, path, old, new, why, count

    def apply(self, root: Path) -> str:
        f = root / self.path
        text = f.read_text()
        found = text.count(self.old)
        if found != self.count:
            raise SystemExit(f"patch {self.label}: {self.old!r} found {found} times in {self.path}, expected "
                             f"{self.count}: not the code this driver was written for (zkkli/PSAQ-ViT@d2c726f)")
        line = text[:text.index(self.old)].count("\n") + 1
        f.write_text(text.replace(self.old, self.new))
        return f"{self.label} {self.path}:{line}: {self.why}"


def edits(a, n_classes: int, img: int, mean, std, device: str) -> list[Edit]:
    dev = repr(device)
    m = "[" + ", ".join(f"{float(v):g}" for v in mean) + "]"
    s = "[" + ", ".join(f"{float(v):g}" for v in std) + "]"
    out = [
        Edit("B1", "utils/build_model.py", "def attention_forward(self, x):\n",
             "def attention_forward(self, x, attn_mask=None, is_causal=False):  # dfqbench B1\n"
             "    assert attn_mask is None and not is_causal\n",
             "attention_forward takes timm>=1.0's attn_mask/is_causal arguments (asserted None/False)"),
        Edit("B2", "utils/build_model.py", "net = timm.create_model(name, pretrained=Pretrained)",
             "net = name if isinstance(name, nn.Module) else timm.create_model(name, pretrained=Pretrained)"
             "  # dfqbench B2",
             "build_model(name): a module given as `name` is used as the network (the dfqbench teacher) instead of "
             "timm.create_model(name, pretrained=True)"),
        Edit("B3", "utils/build_model.py", "net = net.cuda()", f"net = net.to({dev})  # dfqbench B3",
             f"net.cuda() -> net.to({dev})"),
        Edit("G1", "generate_data.py", "p_model = build_model(model_zoo[args.model], Pretrained=True)",
             "p_model = build_model(DFQ_TEACHER(), Pretrained=True)  # dfqbench G1",
             "synthesis teacher: build_model(<a deep copy of the dfqbench teacher>) instead of the timm zoo download "
             "(MatMul wrapping and attention_forward as the code does)"),
        Edit("G2", "generate_data.py", "img = torch.randn((args.batch_size, 3, 224, 224)).cuda()",
             f"img = torch.randn((args.batch_size, 3, {img}, {img})).to({dev})  # dfqbench G2",
             f"initial images (B, 3, 224, 224) -> (B, 3, {img}, {img}), on {device}"),
        Edit("G3a", "generate_data.py", "random.randint(0, 999)", f"random.randint(0, {n_classes - 1})",
             f"random labels randint(0, 999) -> randint(0, {n_classes - 1}) ({n_classes} classes)"),
        Edit("G3b", "generate_data.py", ".to('cuda')", f".to({dev})", f"labels .to('cuda') -> .to({dev})"),
        Edit("G4", "generate_data.py", ".repeat(args.batch_size, 1).cuda()",
             f".repeat(args.batch_size, 1).to({dev})", f"KDE grid .cuda() -> .to({dev})"),
        Edit("G5a", "generate_data.py", "[0.485, 0.456, 0.406]", m,
             f"clip(): mean (0.485, 0.456, 0.406) -> the data set's {m} (fp32 and fp16 branches)", count=2),
        Edit("G5b", "generate_data.py", "[0.229, 0.224, 0.225]", s,
             f"clip(): std (0.229, 0.224, 0.225) -> the data set's {s} (the clamp stays the [0, 1] pixel box)",
             count=2),
    ]
    if tuple(a.jitter) != OFFICIAL_JITTER:
        out += [Edit("S1a", "generate_data.py", "lim = 15", f"lim = {a.jitter[0]}  # dfqbench S1",
                     f"32x32 scaling: epoch-1 roll jitter 15 -> {a.jitter[0]} (dfqbench method.jitter)"),
                Edit("S1b", "generate_data.py", "lim = 30", f"lim = {a.jitter[1]}  # dfqbench S1",
                     f"32x32 scaling: epoch-2 roll jitter 30 -> {a.jitter[1]} (dfqbench method.jitter)")]
    if tuple(a.tv_target) != OFFICIAL_TV:
        lo, hi = a.tv_target
        out.append(Edit("S2", "generate_data.py", "random.uniform(2500, 3000)", f"random.uniform({lo!r}, {hi!r})",
                        f"32x32 scaling: TV target U(2500, 3000) -> U({lo:g}, {hi:g}) (dfqbench method.tv_target)"))
    if a.iterations != OFFICIAL_ITERATIONS:
        out.append(Edit("S3", "generate_data.py", "iterations_per_layer = 500",
                        f"iterations_per_layer = {a.iterations}  # dfqbench S3",
                        f"budget: 500 -> {a.iterations} iterations per epoch (both epochs; warm-up stays 100)",
                        count=2))
    if a.fast_cosine:
        out.append(Edit(
            "P1", "generate_data.py",
            "sims = torch.cosine_similarity(attention_p.unsqueeze(1), attention_p.unsqueeze(2), dim=3)",
            "_unit = F.normalize(attention_p, dim=-1, eps=1e-8)  # dfqbench P1 (--fast-cosine)\n"
            "                    sims = _unit @ _unit.transpose(1, 2)",
            "--fast-cosine: broadcast torch.cosine_similarity -> F.normalize + batched matmul (same values, see "
            "cosine_check; the broadcast op's backward costs ~0.6 s per block on one CPU thread)"))
    out += [
        Edit("T1", "test_quant.py", "model = str2model(args.model)(pretrained=True, cfg=cfg)",
             "model = DFQ_QUANT_MODEL(cfg)  # dfqbench T1",
             "quantized model: models/vit_quant.py VisionTransformer with the teacher's configuration, strict=False "
             "load of the dfqbench checkpoint (only QuantAct x_min/x_max missing, asserted)"),
        Edit("T2", "test_quant.py", "train_loader, val_loader = build_dataset(args)",
             "train_loader, val_loader = DFQ_DATASET(args)  # dfqbench T2",
             "build_dataset(args) -> (no train loader, the dfqbench test set in batches of --val-batchsize)"),
        Edit("T3", "test_quant.py", "torch.randn((args.calib_batchsize, 3, 224, 224))",
             f"torch.randn((args.calib_batchsize, 3, {img}, {img}))",
             f"mode 1 Gaussian batch (B, 3, 224, 224) -> (B, 3, {img}, {img})"),
        Edit("I1", "test_quant.py", "    # Freeze model\n    model.model_quant()",
             "    # Freeze model\n    DFQ_MARK('calibrated')  # dfqbench I1\n    model.model_quant()",
             "instrumentation: a time mark after the calibration forward"),
        Edit("I2", "test_quant.py", "    if args.mode == 0:\n        print(\"Generating data...\")",
             "    DFQ_MARK('calibration_start')  # dfqbench I2\n"
             "    if args.mode == 0:\n        print(\"Generating data...\")",
             "instrumentation: a time mark before the calibration batch is made"),
        Edit("I3", "test_quant.py", "        args, val_loader, model, criterion, device\n    )\n",
             "        args, val_loader, model, criterion, device\n    )\n"
             "    DFQ_DONE(model, calibrate_data, val_loss, val_prec1, val_prec5)  # dfqbench I3\n",
             "instrumentation: validate()'s top-1/top-5, the model and the calibration batch handed back"),
    ]
    return out


# --- the teacher in the official quantized model --------------------------------------------------------------

def teacher_config(teacher) -> dict:
    """The official VisionTransformer's arguments for a timm VisionTransformer teacher, or SystemExit naming the
    feature the FQ-ViT-style model of the official code does not have."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from torch import nn
    if not isinstance(teacher, TimmViT):
        raise SystemExit(f"the teacher is a {type(teacher).__name__}, not a timm VisionTransformer")
    pe, blk = teacher.patch_embed, teacher.blocks[0]
    checks = {
        "a class token": teacher.cls_token is not None, "no register tokens": teacher.reg_token is None,
        "global_pool='token'": teacher.global_pool == "token", "no fc_norm": isinstance(teacher.fc_norm, nn.Identity),
        "no norm_pre": isinstance(teacher.norm_pre, nn.Identity),
        "no patch-embed norm": isinstance(pe.norm, nn.Identity),
        "position embedding over the class token": not teacher.no_embed_class,
        "static image size": not teacher.dynamic_img_size, "square image": pe.img_size[0] == pe.img_size[1],
        "no dropout": teacher.pos_drop.p == 0 and teacher.head_drop.p == 0,
    }
    for b in teacher.blocks:
        checks.update({
            "no layer scale": isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity),
            "no q/k norm": isinstance(b.attn.q_norm, nn.Identity) and isinstance(b.attn.k_norm, nn.Identity),
            "no attention scale norm": isinstance(b.attn.norm, nn.Identity),
            "no attention gate": getattr(b.attn, "gate", None) is None,
            "GELU MLP": isinstance(b.mlp.act, nn.GELU) and isinstance(b.mlp.norm, nn.Identity),
            "LayerNorm eps 1e-6": isinstance(b.norm1, nn.LayerNorm) and b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6,
            "proj bias": b.attn.proj.bias is not None,
        })
    problems = [k for k, ok in checks.items() if not ok]
    if problems:
        raise SystemExit(f"the official VisionTransformer cannot express this teacher: it lacks {problems}")
    return dict(img_size=pe.img_size[0], patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
                num_classes=teacher.num_classes, embed_dim=teacher.embed_dim, depth=len(teacher.blocks),
                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / teacher.embed_dim,
                qkv_bias=blk.attn.qkv.bias is not None, input_quant=True)


def checkpoint_state(loaded, teacher) -> tuple[dict, str]:
    """The state_dict the official model loads: the dfqbench checkpoint file (unwrapped as dfqbench unwraps it),
    or the teacher's own weights when it has no file."""
    import torch
    if loaded.checkpoint:
        state = torch.load(loaded.checkpoint, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "net"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        return state, str(loaded.checkpoint)
    return teacher.state_dict(), f"the teacher's {loaded.weights} weights (no checkpoint file)"


# --- child: one official run ----------------------------------------------------------------------------------

def child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    cfg, loaded, data = common.teacher_and_data(common.teacher_overrides(a))
    teacher = loaded.model.eval()
    tcfg = teacher_config(teacher)
    norm = cfg.model.normalize or cfg.dataset
    mean, std = list(norm.mean), list(norm.std)
    marks: dict = {}

    def mark(name):
        marks[name] = time.perf_counter()

    scratch = Path(tempfile.mkdtemp(prefix="psaqvit-official-"))
    try:
        root = scratch / "PSAQ-ViT"
        shutil.copytree(Path(a.official).resolve(), root, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.png"))
        patches = [e.apply(root) for e in edits(a, tcfg["num_classes"], tcfg["img_size"], mean, std, device.type)]
        print("patches applied to the temporary copy " + str(root) + ":\n  " + "\n  ".join(patches), flush=True)
        sys.path.insert(0, str(root))
        os.chdir(root)
        import generate_data as gd  # the patched copy
        import models.vit_quant as vq

        gd.DFQ_TEACHER = lambda: copy.deepcopy(teacher)
        synth = {}
        generate = gd.generate_data

        def timed_generate(args):
            t0 = time.perf_counter()
            img = generate(args)
            synth["synth_s"] = time.perf_counter() - t0
            return img

        gd.generate_data = timed_generate  # test_quant.py's `from generate_data import generate_data` takes this
        state, state_from = checkpoint_state(loaded, teacher)
        fp, preds = {}, []

        def quant_model(qcfg):
            model = vq.VisionTransformer(**tcfg, cfg=qcfg)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or not all(k.endswith((".x_min", ".x_max")) for k in missing):
                raise SystemExit(f"official VisionTransformer vs checkpoint: unexpected {unexpected}, missing "
                                 f"{[k for k in missing if not k.endswith(('.x_min', '.x_max'))]}")
            ref = teacher.state_dict()
            differ = [k for k, v in model.state_dict().items() if k in ref and not torch.equal(v, ref[k])]
            if differ:
                raise SystemExit(f"the checkpoint's weights are not the teacher's: {differ[:5]}")
            fp["missing_buffers"] = len(missing)
            probe = copy.deepcopy(model).eval()  # its QuantActs would record this probe's ranges: a copy
            x, _ = next(iter(data.batches(64, "cpu")))
            with torch.no_grad():
                fp["fp_max_abs_diff"] = float((probe(x.contiguous()) - teacher(x.contiguous())).abs().max())
            # validate()'s predictions (the forwards after model_quant), for the check's agreement count
            model.register_forward_hook(lambda m, i, o: preds.append(o.argmax(1).cpu()) if "calibrated" in marks
                                        else None)
            return model

        def dataset(args):
            mark("data_ready")
            return None, common.EvalLoader(data, args.val_batchsize, device)

        done = {}

        def finished(model, calib, val_loss, top1, top5):
            done.update(model=model, calib=calib.detach().cpu(), loss=float(val_loss), top1=float(top1),
                        top5=float(top5))

        sys.argv = ["test_quant.py", "--model", "deit_tiny", "--dataset", str(data_root(cfg)), "--mode", str(a.mode),
                    "--w_bit", str(a.wbit), "--a_bit", str(a.abit), "--seed", str(a.seed),
                    "--calib-batchsize", str(a.calib_batchsize), "--val-batchsize", str(a.val_batchsize),
                    "--num-workers", "0", "--device", device.type]
        t0 = time.perf_counter()
        runpy.run_path(str(root / "test_quant.py"), run_name="__main__",
                       init_globals={"DFQ_QUANT_MODEL": quant_model, "DFQ_DATASET": dataset, "DFQ_MARK": mark,
                                     "DFQ_DONE": finished})
        wall = time.perf_counter() - t0
        calib = done["calib"]
        steps = 2 * a.iterations if a.mode == 0 else 0
        result = {"top1": round(done["top1"], 4), "top5": round(done["top5"], 4),
                  "quantize_s": round(marks["calibrated"] - marks["calibration_start"], 3),
                  "synth_s": round(synth.get("synth_s", 0.0), 3), "synth_steps": steps,
                  "synth_s_per_step": round(synth["synth_s"] / steps, 4) if steps else None,
                  "calib_forward_s": round(marks["calibrated"] - marks["calibration_start"]
                                           - synth.get("synth_s", 0.0), 3),
                  "wall_s": round(wall, 3), "mode": a.mode, "mode_name": MODE_NAMES[a.mode],
                  "argv": sys.argv[1:], "patches": patches, "fast_cosine": a.fast_cosine,
                  "iterations": a.iterations, "jitter": list(a.jitter), "tv_target": list(a.tv_target),
                  "official_model_config": tcfg, "checkpoint": state_from, "teacher_sha256": loaded.sha256,
                  "missing_quantizer_buffers": fp["missing_buffers"],
                  "fp_max_abs_diff_vs_teacher": fp["fp_max_abs_diff"],
                  "calib_shape": list(calib.shape), "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
                  "calib_min": float(calib.min()), "calib_max": float(calib.max()), "calib_mean": float(calib.mean()),
                  "clip_mean": mean, "clip_std": std, "device": device.type, "threads": torch.get_num_threads(),
                  "n_test": data.num_samples, "model": cfg.model.name, "arch": str(cfg.model.arch),
                  "dataset": str(cfg.dataset.name)}
        if a.compare:
            try:
                result["check"] = compare(done["model"], calib, teacher, data, a, device, torch.cat(preds))
            except Exception as exc:  # the check must not cost the official number
                result["check_error"] = repr(exc)
            if a.mode == 0:
                try:
                    result["loss_check"] = loss_check(gd, teacher, calib, a, device)
                except Exception as exc:
                    result["loss_check_error"] = repr(exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result))


def data_root(cfg) -> str:
    try:
        return str(cfg.dataset.root)
    except Exception:  # an unset environment variable in the interpolation
        return "(dfqbench test set)"


def compare(official_model, calib, teacher, data, a, device, official_preds) -> dict:
    """dfqbench quant=psaqvit calibrated (observe=float) on the official batch, beside the official model
    (`official_preds`: its validate() predictions, test-set order)."""
    import torch
    from omegaconf import OmegaConf

    from dfqbench.quant import ActQuantizer, Convention, quant_layers, quantize_model
    from dfqbench.quant.calibration.calibrate import calibrate_on_batches
    qm = sys.modules["models.quantization_utils.quant_modules"]

    conv_cfg = common.compose([*common.teacher_overrides(a), f"quant={QUANT}", f"wbit={a.wbit}",
                               f"abit={a.abit}"]).quant
    convention = Convention.from_dict(OmegaConf.to_container(conv_cfg, resolve=True))
    ours = quantize_model(copy.deepcopy(teacher).to(device), convention, a.wbit, a.abit)
    calibrate_on_batches(ours, [calib.to(device)], observe="float")
    # weights
    layers = quant_layers(ours)
    theirs = [m for m in official_model.modules() if isinstance(m, (qm.QuantConv2d, qm.QuantLinear))]
    differing = total = 0
    for m in theirs:
        w = m.weight.detach()
        layer = next(lay for lay in layers if lay.weight.shape == w.shape and torch.equal(lay.weight, w))
        flat = w.reshape(w.shape[0], -1)
        with torch.no_grad():
            official_w = m.weight_function(m.weight, m.weight_bit, flat.min(1).values, flat.max(1).values)
            amax = torch.maximum(-flat.min(1).values, flat.max(1).values)
            step = (amax / ((2 ** a.wbit - 1) / 2)).reshape(-1, *[1] * (w.dim() - 1))
            differing += int(((official_w - layer.quantized_weight()).abs() / step > 0.5).sum())
        total += w.numel()
    # activation quantizers in the order a forward calls them
    probe, _ = next(iter(data.batches(2, "cpu")))

    def call_order(model, cls):
        calls, hooks = [], []
        for name, mod in model.named_modules():
            if isinstance(mod, cls):
                hooks.append(mod.register_forward_hook(
                    lambda m, i, o, name=name: calls.append((name, m, tuple(i[0].shape)))))
        with torch.no_grad():
            model(probe.contiguous().to(device))
        for h in hooks:
            h.remove()
        return calls

    off = call_order(official_model, qm.QuantAct)
    mine = [c for c in call_order(ours, ActQuantizer) if c[1].enabled]
    pairs, used = [], set()
    for name, m, shape in off:  # greedy: the next unused dfqbench quantizer on a tensor of as many elements
        j = next((j for j, c in enumerate(mine) if j not in used and math.prod(c[2]) == math.prod(shape)), None)
        if j is not None:
            used.add(j)
            pairs.append((name, m, mine[j][0], mine[j][1]))
    rows, worst = [], 0.0
    for name, t, oname, o in pairs:
        tlo, thi, olo, ohi = float(t.x_min), float(t.x_max), float(o.lo), float(o.hi)
        width = max(thi - tlo, 1e-12)
        diff = max(abs(tlo - olo), abs(thi - ohi)) / width
        worst = max(worst, diff)
        rows.append({"official": name, "dfqbench": oname, "official_range": [round(tlo, 6), round(thi, 6)],
                     "dfqbench_range": [round(olo, 6), round(ohi, 6)], "rel_diff": round(diff, 8),
                     "official_range_excludes_0": tlo > 0 or thi < 0})
    ours.eval()
    mine_preds, labels = [], []
    with torch.no_grad():
        for x, y in data.batches(a.val_batchsize, device):
            mine_preds.append(ours(x).argmax(1).cpu())
            labels.append(y.cpu())
    mine_preds, labels = torch.cat(mine_preds), torch.cat(labels)
    top1 = 100.0 * float((mine_preds == labels).float().mean())
    agree = 100.0 * float((mine_preds == official_preds).float().mean()) if len(official_preds) == len(labels) \
        else None
    return {"weight_layers": len(theirs), "dfqbench_weight_layers": len(layers), "weights": total,
            "weights_differing": differing, "act_quantizers": len(off), "dfqbench_act_quantizers": len(mine),
            "act_matched": len(pairs), "act_range_max_rel_diff": worst,
            "official_ranges_excluding_0": sum(r["official_range_excludes_0"] for r in rows),
            "act_ranges": rows, "quant": QUANT, "dfqbench_on_official_batch_top1": round(top1, 4),
            "prediction_agreement_pct": agree}


def loss_check(gd, teacher, img, a, device) -> dict:
    """The official loss terms (patched generate_data's own functions, hooks on the matmul2 of a build_model()
    teacher, the official broadcast cosine) beside dfqbench.synth.patch_similarity's on the same image batch
    (no jitter), values and gradients with respect to the image; and the P1 replacement's error."""
    import torch
    import torch.nn.functional as F

    from dfqbench.synth.patch_similarity import attention_modules, kde_entropy, patch_similarity, total_variation
    img = img.to(device)
    n = img.shape[0]
    labels = torch.arange(n, device=device) % teacher.num_classes
    tv_target = float(sum(a.tv_target)) / 2

    # official
    p_model = gd.build_model(copy.deepcopy(teacher), Pretrained=True)
    hooks = [gd.AttentionMap(m.attn.matmul2) for m in p_model.blocks]
    x = img.clone().requires_grad_(True)
    out = p_model(x)
    ent_o, ent_f, sims_diff, blocks = 0.0, 0.0, 0.0, []
    for h in hooks:
        p = h.feature.mean(dim=1)[:, 1:, :]
        sims = torch.cosine_similarity(p.unsqueeze(1), p.unsqueeze(2), dim=3)
        unit = F.normalize(p, dim=-1, eps=1e-8)
        fast = unit @ unit.transpose(1, 2)
        sims_diff = max(sims_diff, float((sims - fast).abs().max()))
        terms = []
        for s in (sims, fast):
            kde = gd.KernelDensityEstimator(s.view(n, -1))
            grid = torch.linspace(s.min().item(), s.max().item(), steps=10).repeat(n, 1).to(device)
            terms.append(gd.differential_entropy(kde(grid), grid))
        ent_o, ent_f = ent_o - terms[0], ent_f - terms[1]
        blocks.append(float(terms[0]))
    ce_o = F.cross_entropy(out, labels)
    tv_o = torch.norm(gd.get_image_prior_losses(x) - tv_target)
    loss_o = ent_o + ce_o + 0.05 * tv_o
    grad_o, = torch.autograd.grad(loss_o, x, retain_graph=True)
    loss_f = ent_f + ce_o + 0.05 * tv_o
    grad_f, = torch.autograd.grad(loss_f, x)
    for h in hooks:
        h.remove()

    # dfqbench (psaq_images' hook: the proj input, heads averaged, prefix tokens dropped)
    model = copy.deepcopy(teacher).to(device).eval()
    attns = attention_modules(model)
    feats = []
    heads = {m.proj: m.num_heads for m in attns}

    def keep(module, args):
        b, t, c = args[0].shape
        feats.append(args[0].view(b, t, heads[module], c // heads[module]).mean(2)[:, 1:])

    handles = [m.proj.register_forward_pre_hook(keep) for m in attns]
    y = img.clone().requires_grad_(True)
    logits = model(y)
    ent_d = sum(kde_entropy(patch_similarity(f), 0.01, 10) for f in feats)
    ce_d = F.cross_entropy(logits, labels)
    tv_d = (total_variation(y) - tv_target).abs()
    loss_d = -ent_d + ce_d + 0.05 * tv_d
    grad_d, = torch.autograd.grad(loss_d, y)
    for h in handles:
        h.remove()

    def rel(g, ref):
        return float((g - ref).norm() / ref.norm().clamp_min(1e-30))

    return {"entropy_per_block": blocks, "official_loss": float(loss_o), "dfqbench_loss": float(loss_d),
            "loss_abs_diff": abs(float(loss_o) - float(loss_d)),
            "terms_official": {"entropy": float(-ent_o), "ce": float(ce_o), "tv": float(tv_o)},
            "terms_dfqbench": {"entropy": float(ent_d), "ce": float(ce_d), "tv": float(tv_d)},
            "grad_rel_diff_dfqbench_vs_official": rel(grad_d, grad_o),
            "cosine_check": {"sims_max_abs_diff": sims_diff, "loss_abs_diff": abs(float(loss_o) - float(loss_f)),
                             "grad_max_abs_diff": float((grad_f - grad_o).abs().max()),
                             "grad_rel_diff": rel(grad_f, grad_o)}}


# --- parent: cells, seeds, records, parity.csv ----------------------------------------------------------------

def parse_bits(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected w<W>a<A>, e.g. w4a8")
    return int(m.group(1)), int(m.group(2))


def settings_of(a, mode: int, wbit: int, abit: int, commit: str) -> dict:
    """What an official seed's result must match to be kept by --resume."""
    s = {"official_commit": commit, "mode": mode, "wbit": wbit, "abit": abit, "calib_batchsize": a.calib_batchsize,
         "teacher_overrides": common.teacher_overrides(a)}
    if mode == 0:
        s.update(iterations=a.iterations, jitter=list(a.jitter), tv_target=list(a.tv_target),
                 fast_cosine=a.fast_cosine)
    return s


def official_cell(a, repo, commit, mode, wbit, abit, cell: Path) -> tuple[list[dict], dict]:
    runs = []
    want = settings_of(a, mode, wbit, abit, commit)
    for seed in a.seeds:
        kept = cell / f"official-s{seed}.json"
        if a.resume and kept.exists():
            r = json.loads(kept.read_text())
            if r.get("settings") == want and "top1" in r:
                runs.append(r)
                print(f"official {MODE_NAMES[mode]} W{wbit}A{abit} seed {seed}: reusing {common.rel(kept)} "
                      f"(top-1 {r['top1']:.2f})", flush=True)
                continue
        args = common.child_args(a, seed, wbit, abit) + [
            "--mode", str(mode), "--iterations", str(a.iterations), "--jitter", *map(str, a.jitter),
            "--tv-target", *map(str, a.tv_target), "--calib-batchsize", str(a.calib_batchsize),
            "--val-batchsize", str(a.val_batchsize)]
        args += [] if a.fast_cosine else ["--no-fast-cosine"]
        args += [] if a.compare else ["--no-compare"]
        args += ["--cpu"] if a.cpu else []
        env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
        r = common.run_child(Path(__file__), args, cell / f"official-s{seed}.log.txt", env)
        r.update(seed=seed, settings=want, official_repo=repo)
        common.write_json(kept, r)
        runs.append(r)
        if r["patches"] not in _PRINTED_PATCHES:  # once per driver run (they differ only with the options)
            _PRINTED_PATCHES.append(r["patches"])
            print("official code patches (temporary copy):\n  " + "\n  ".join(r["patches"]), flush=True)
        msg = (f"official {MODE_NAMES[mode]} W{wbit}A{abit} seed {seed}: top-1 {r['top1']:.2f}, quantize "
               f"{r['quantize_s']:.1f} s")
        if r["synth_steps"]:
            msg += (f" (synthesis {r['synth_s']:.1f} s = {r['synth_s_per_step']:.3f} s/step x {r['synth_steps']}, "
                    f"fast-cosine {'on' if r['fast_cosine'] else 'off'})")
        chk = r.get("check")
        if chk:
            msg += (f"; dfqbench quant={QUANT} on the official batch {chk['dfqbench_on_official_batch_top1']:.2f}, "
                    f"weights differing {chk['weights_differing']}/{chk['weights']}, act quantizers "
                    f"{chk['act_quantizers']} official / {chk['dfqbench_act_quantizers']} dfqbench, range max rel "
                    f"diff {chk['act_range_max_rel_diff']:.1e}, same prediction on "
                    f"{common.fmt(chk['prediction_agreement_pct'])} % of the test images")
        lc = r.get("loss_check")
        if lc:
            msg += (f"; loss official {lc['official_loss']:.5f} dfqbench {lc['dfqbench_loss']:.5f} (grad rel diff "
                    f"{lc['grad_rel_diff_dfqbench_vs_official']:.1e}); cosine P1 sims max diff "
                    f"{lc['cosine_check']['sims_max_abs_diff']:.1e}, grad rel diff "
                    f"{lc['cosine_check']['grad_rel_diff']:.1e}")
        for key in ("check_error", "loss_check_error"):
            if key in r:
                msg += f"; {key}: {r[key]}"
        print(msg, flush=True)
    top1 = common.mean_std([r["top1"] for r in runs])
    secs = common.mean_std([r["quantize_s"] for r in runs])
    record = {"method": MODES[mode], "official_mode": mode, "official_repo": repo, "official_commit": commit,
              "wbit": wbit, "abit": abit, "seeds": a.seeds, "top1_mean": round(top1[0], 4),
              "top1_std": round(top1[1], 4), "quantize_s_mean": round(secs[0], 3), "settings": want,
              "patches": runs[0]["patches"], "runs": runs, "model": runs[0]["model"], "dataset": runs[0]["dataset"],
              "n_test": runs[0]["n_test"], "device": runs[0]["device"],
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if all("check" in r for r in runs):
        chk = common.mean_std([r["check"]["dfqbench_on_official_batch_top1"] for r in runs])
        record.update(dfqbench_on_official_batch_top1_mean=round(chk[0], 4),
                      dfqbench_on_official_batch_top1_std=round(chk[1], 4))
    common.write_json(cell / "official.json", record)
    print(f"official {MODE_NAMES[mode]} W{wbit}A{abit}: top-1 {top1[0]:.2f} +- {top1[1]:.2f} over seeds {a.seeds}, "
          f"quantize {secs[0]:.1f} s ({repo}@{commit[:10]})", flush=True)
    return runs, record


def dfqbench_overrides(a, mode: int, wbit: int, abit: int, seed: int) -> list[str]:
    over = [f"method={MODES[mode]}", f"quant={QUANT}", f"wbit={wbit}", f"abit={abit}", f"seed={seed}",
            f"threads={a.threads}"]
    if mode == 0:
        over += [f"method.batch_size={a.calib_batchsize}", f"method.iterations={a.iterations}",
                 f"method.jitter=[{a.jitter[0]},{a.jitter[1]}]",
                 f"method.tv_target=[{float(a.tv_target[0])},{float(a.tv_target[1])}]"]
    else:
        over += [f"method.num_images={a.calib_batchsize}", f"method.batch_size={a.calib_batchsize}"]
    return over + list(a.method_overrides) + common.teacher_overrides(a)


def dfqbench_cell(a, mode, wbit, abit, cell: Path) -> tuple[list[dict], list[dict]]:
    ours = []
    for seed in a.seeds:
        over = dfqbench_overrides(a, mode, wbit, abit, seed)
        dest = cell / f"dfqbench-{QUANT}-s{seed}"
        kept = dest.with_name(dest.name + ".record.json")
        r = common.kept_record(kept, f"dfqbench {MODES[mode]} W{wbit}A{abit} seed {seed}") if a.resume else None
        if r is not None:
            if [o for o in r.get("overrides", []) if o not in ("force=true", "progress=false")] == over:
                ours.append(r)
                print(f"dfqbench {MODES[mode]} W{wbit}A{abit} seed {seed}: reusing {common.rel(kept)} "
                      f"(top-1 {r['top1']:.2f})", flush=True)
                continue
        t0 = time.perf_counter()
        r = common.run_dfqbench(over, dest, cell / "dfqbench.log.txt")
        r["_process_s"] = round(time.perf_counter() - t0, 3)
        ours.append(r)
        info = r.get("info") or {}
        print(f"dfqbench {MODES[mode]} W{wbit}A{abit} seed {seed}: top-1 {r['top1']:.2f}, quantize "
              f"{r['quantize_time_s']:.1f} s" + (" (calibration images from the cache)" if info.get("calib_cached")
                                                 else ""), flush=True)
    fresh = [r for r in ours if not (r.get("info") or {}).get("calib_cached")]
    for seed, r in zip(a.seeds, ours):
        if not (r.get("info") or {}).get("calib_cached"):
            _FRESH_S.setdefault((mode, seed), r["quantize_time_s"])
    return ours, fresh


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a clone of zkkli/PSAQ-ViT")
    p.add_argument("--modes", type=int, nargs="+", default=[0, 1], choices=sorted(MODES),
                   help="test_quant.py --mode: 0 PSAQ-ViT (dfqbench method=psaqvit), 1 Gaussian noise "
                        "(method=gaussian_calib) (default 0 1)")
    p.add_argument("--bits", type=parse_bits, nargs="+", default=[(4, 8), (8, 8)],
                   help="w<W>a<A> cells (default w4a8 w8a8, the README's; add w4a4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test_quant.py --seed / dfqbench seed (default 0 1 2)")
    common.add_teacher_arguments(p, model="vit_cifar10", teacher_help="e.g. model.checkpoint=PATH")
    p.add_argument("--iterations", type=int, default=OFFICIAL_ITERATIONS,
                   help="synthesis iterations per epoch, both sides (official 500; smoke tests only)")
    p.add_argument("--jitter", type=int, nargs=2, default=[2, 4],
                   help="roll jitter limits of the two epochs, both sides (official 15 30 at 224 px; default 2 4, "
                        "dfqbench's 32x32 scaling)")
    p.add_argument("--tv-target", type=float, nargs=2, default=[357.0, 429.0],
                   help="TV target U(lo, hi), both sides (official 2500 3000 at 224 px; default 357 429)")
    p.add_argument("--fast-cosine", action=argparse.BooleanOptionalAction, default=True,
                   help="official side: normalize+bmm for the broadcast torch.cosine_similarity (patch P1; same "
                        "values, measured in each run's loss_check); --no-fast-cosine runs the official op")
    p.add_argument("--calib-batchsize", type=int, default=32)
    p.add_argument("--val-batchsize", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--dfqbench", action="store_true", help="also run dfqbench on the same cells, write parity.csv")
    p.add_argument("--method-overrides", nargs="*", default=[], help="more dfqbench overrides for --dfqbench")
    common.add_output_arguments(p, OUT, reuse_official=False)
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the child's checks (dfqbench's quantizer on the official batch, the loss terms)")
    p.add_argument("--resume", action="store_true",
                   help="keep finished seeds: official-s<S>.json with the same settings and commit, "
                        "dfqbench-psaqvit-s<S>.record.json with the same overrides and dfqbench source")
    common.add_child_arguments(p, bits=8)
    p.add_argument("--mode", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return
    repo, commit = common.clone_identity(Path(a.official), DEFAULT_REPO, "generate_data.py")
    out = Path(a.out) / a.tag if a.tag else Path(a.out)
    print(f"PSAQ-ViT parity: {repo}@{commit[:10]} from {Path(a.official).resolve()} (temporary patched copies); "
          f"modes {a.modes}, bits {['w%da%d' % b for b in a.bits]}, seeds {a.seeds}; synthesis {a.iterations} x 2 "
          f"iterations, jitter {a.jitter}, TV target U({a.tv_target[0]:g}, {a.tv_target[1]:g}); fast-cosine "
          f"{'ON (patch P1: normalize+bmm for torch.cosine_similarity)' if a.fast_cosine else 'off (official op)'}; "
          f"{a.threads} thread(s); out {out}", flush=True)
    for mode in a.modes:
        for wbit, abit in a.bits:
            cell = out / f"{MODES[mode]}-w{wbit}a{abit}"
            runs, record = official_cell(a, repo, commit, mode, wbit, abit, cell)
            if not a.dfqbench:
                continue
            ours, fresh = dfqbench_cell(a, mode, wbit, abit, cell)
            top1, secs = common.mean_std([r["top1"] for r in runs]), common.mean_std([r["quantize_s"] for r in runs])
            d_top1 = common.mean_std([r["top1"] for r in ours])
            # seconds: the runs that made their calibration images; a seed whose images came from dfqbench's cache
            # (made by this driver in another cell: they do not depend on the bit-widths) counts that run's seconds
            borrowed = [s for s, r in zip(a.seeds, ours) if (r.get("info") or {}).get("calib_cached")
                        and (mode, s) in _FRESH_S]
            timed = [r["quantize_time_s"] for r in fresh] + [_FRESH_S[(mode, s)] for s in borrowed]
            d_secs = common.mean_std(timed)
            common.write_json(cell / "dfqbench.json", {
                "method": MODES[mode], "quant": QUANT, "wbit": wbit, "abit": abit, "seeds": a.seeds,
                "top1_mean": round(d_top1[0], 4), "top1_std": round(d_top1[1], 4),
                "quantize_s_mean": round(d_secs[0], 3) if timed else None, "fresh_seeds": len(fresh),
                "timed_seeds": len(timed),
                "runs": [{"seed": s, "top1": r["top1"], "quantize_time_s": r["quantize_time_s"],
                          "synthesis_time_s": (r.get("info") or {}).get("synthesis_time_s"),
                          "calib_cached": bool((r.get("info") or {}).get("calib_cached")),
                          "record": common.rel(cell / f"dfqbench-{QUANT}-s{s}.record.json"),
                          "overrides": dfqbench_overrides(a, mode, wbit, abit, s)} for s, r in zip(a.seeds, ours)],
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            print(f"dfqbench method={MODES[mode]} quant={QUANT} W{wbit}A{abit}: top-1 {d_top1[0]:.2f} +- "
                  f"{d_top1[1]:.2f}, quantize {common.fmt(d_secs[0], 1) or '(all cached)'} s; official "
                  f"{top1[0]:.2f} +- {top1[1]:.2f}, {secs[0]:.1f} s", flush=True)
            synth = (f"synthesis {a.iterations}x2 iterations, jitter {a.jitter[0]}/{a.jitter[1]}, TV target "
                     f"U({a.tv_target[0]:g}, {a.tv_target[1]:g}) (32x32 scaling), official fast-cosine "
                     f"{'on' if a.fast_cosine else 'off'}; " if mode == 0 else "")
            common.write_row(
                a.csv, method=MODES[mode], quant=QUANT, wbit=wbit, abit=abit, n_seeds=len(a.seeds),
                official=(top1, secs), dfqbench=(d_top1, d_secs), repo=repo, commit=commit, run=runs[0],
                note=f"official test_quant.py --mode {mode} ({MODE_NAMES[mode]}) on the dfqbench ViT in the "
                     f"code's own quantized VisionTransformer; {QUANT_NOTE}; {synth}one calibration batch of "
                     f"{a.calib_batchsize}; seeds {' '.join(map(str, a.seeds))}; seconds = calibration batch + "
                     f"calibration (dfqbench: {len(timed)} seed(s) timed, {len(borrowed)} of them by "
                     f"the same seed's run in another cell, its images read from the cache here); "
                     f"{runs[0]['n_test']} test images; records {common.rel(cell)}")


if __name__ == "__main__":
    main()
