"""Train the CIFAR-10 vision-transformer teacher (dfqbench.archs.vit_cifar10) on an ImageFolder copy of the data.

The committed models/vit_cifar10.pt (test top-1 82.77) is this recipe, trained on a lent H200 by
scripts/gpu_train_teachers.sh (367 s) and evaluated here by rerunning it (on the CPU, about 8 minutes an epoch):

    python scripts/train_vit_teacher.py --data ../shared/data/cifar10-jpeg --out models/ \
        --distill-from ../shared/models/resnet20_cifar10.pt --epochs 50 --threads 2 [--device cuda]

Recipe (DeiT's, shortened for CPUs): AdamW (lr 1e-3 at batch 128, weight decay 0.05 on weights only, not on
biases, norms, position embedding or class token), linear warm-up then cosine decay to 1e-5, label smoothing 0.1,
random crop (pad 4) + horizontal flip, gradient clipping at norm 1. With --distill-from a CNN teacher (DeiT's soft
distillation): loss = (1 - alpha) * CE(label) + alpha * T^2 * KL(teacher || student) at temperature T; a ViT
trained on 50,000 images for a few dozen epochs is far from converged, and the CNN's dark knowledge speeds it up.

Training resumes: the state (model, optimizer, epoch, random generators) is saved atomically after every epoch to
<out>/.<arch>.resume.pt, and a rerun with the same arguments continues from it (a session may end at any time).
Writes <out>/<arch>.pt (state_dict) and <out>/<arch>.json (test top-1, sha256, recipe) at the end, atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train_teacher import (MEAN, STD, Resumable, accuracy, augment, check_device, load_splits, no_test_split,
                           normalize, write_atomic)


def param_groups(model, weight_decay: float):
    """Weight decay on matrices/kernels only (DeiT/timm: not on biases, norms, pos_embed, cls_token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def load_cnn_teacher(path: Path):
    from pytorchcv.model_provider import get_model

    teacher = get_model("resnet20_cifar10", pretrained=False)
    teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return teacher.eval().to(memory_format=torch.channels_last)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_cifar10", help="a transformer in dfqbench.archs.ARCHS")
    ap.add_argument("--data", type=Path, required=True, help="folder with train/ and test/ ImageFolder splits")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--warmup-epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--distill-from", type=Path, default=None,
                    help="a pytorchcv resnet20_cifar10 state_dict (the shared teacher) for soft distillation")
    ap.add_argument("--alpha", type=float, default=0.5, help="distillation weight")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (training; the test top-1 is computed on the "
                                                    "device the evaluating run uses)")
    args = ap.parse_args(argv)
    from dfqbench.archs import ARCHS

    if args.arch not in ARCHS:
        raise SystemExit(f"train_vit_teacher: error: --arch={args.arch!r} is unknown; choose one of: "
                         f"{', '.join(ARCHS)}")
    if args.epochs < 1 or args.warmup_epochs >= args.epochs:
        raise SystemExit(f"train_vit_teacher: error: --epochs={args.epochs} must exceed --warmup-epochs="
                         f"{args.warmup_epochs}")
    device = check_device(args.device, "train_vit_teacher")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = torch.Generator().manual_seed(args.seed)
    x_train, y_train, classes, x_test, y_test = load_splits(args.data, "train_vit_teacher")
    x_train, y_train = x_train.to(device), y_train.to(device)
    model = ARCHS[args.arch](num_classes=len(classes)).to(device)
    teacher = load_cnn_teacher(args.distill_from).to(device) if args.distill_from else None
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    steps = len(x_train) // args.batch_size
    total, warmup = args.epochs * steps, args.warmup_epochs * steps
    args.out.mkdir(parents=True, exist_ok=True)
    resumable = Resumable(args.out / f".{args.arch}.resume.pt", args, "train_vit_teacher", rng, model=model, opt=opt)
    start, spent = resumable.restore()
    for epoch in range(start, args.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=rng)
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + i, total, warmup, args.lr, 1e-5)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = normalize(augment(x_train[idx], rng), MEAN, STD)
            logits = model(x)
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=args.label_smoothing)
            if teacher is not None:
                with torch.inference_mode():
                    soft = teacher(x.contiguous(memory_format=torch.channels_last)) / args.temperature
                kd = F.kl_div(F.log_softmax(logits / args.temperature, 1), F.log_softmax(soft.clone(), 1),
                              reduction="batchmean", log_target=True)
                loss = (1 - args.alpha) * loss + args.alpha * args.temperature ** 2 * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        spent += time.perf_counter() - t0
        resumable.save(epoch + 1, spent)
        top1 = (accuracy(model, x_test[:2000], y_test[:2000], MEAN, STD)
                if x_test is not None and (epoch + 1) % 5 == 0 else float("nan"))
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, test[:2000] {top1:.2f} ({spent:.0f} s)",
              file=sys.stderr, flush=True)
    if x_test is None:
        return no_test_split(resumable, args.data, "train_vit_teacher")
    top1 = accuracy(model, x_test, y_test, MEAN, STD)
    weights = args.out / f"{args.arch}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda tmp: torch.save(state, tmp))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    facts = {"arch": args.arch, "source": "dfqbench.archs layout (timm VisionTransformer), trained from scratch by "
                                          "scripts/train_vit_teacher.py",
             "epochs": args.epochs, "test_top1": round(top1, 2), "normalize_mean": list(MEAN),
             "normalize_std": list(STD), "sha256": sha, "train_seconds": round(spent, 1), "seed": args.seed,
             "data": str(args.data),
             "recipe": {"optimizer": f"AdamW, weight decay {args.weight_decay} (weights only)",
                        "batch_size": args.batch_size,
                        "lr": f"peak {args.lr}, {args.warmup_epochs} warm-up epochs, cosine to 1e-5",
                        "label_smoothing": args.label_smoothing, "grad_clip": 1.0,
                        "augment": "random crop (pad 4) + horizontal flip",
                        "distillation": None if teacher is None else
                        f"soft KD from {args.distill_from.name} (resnet20_cifar10), alpha {args.alpha}, "
                        f"T {args.temperature}", "threads": args.threads, "trained_on": resumable.devices}}
    write_atomic(args.out / f"{args.arch}.json", lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=1)))
    resumable.finish()
    print(f"{args.arch}: test top-1 {top1:.2f} after {args.epochs} epochs ({spent:.0f} s) -> {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
