"""Train an FP32 CIFAR teacher of your own (a pytorchcv architecture) on an ImageFolder copy of the data set.

Also trains dfqbench's own architectures (dfqbench.archs.ARCHS: the teacher pool's vgg8_bn_cifar10 and
mobilenetv2_cifar10, the stand-in seq_conv1d_cifar10). The committed models/seq_conv1d_cifar10.pt, a 1-D conv net
on CIFAR-10 images read column by column, standing in for a speech model (Q-ASR), is

    python scripts/train_teacher.py --arch seq_conv1d_cifar10 --data ../shared/data/cifar10-jpeg \
        --epochs 15 --threads 1 --out models/

The pool's committed models/vgg8_bn_cifar10.pt (84.76) and models/mobilenetv2_cifar10.pt (79.27) are
`--arch <arch> --epochs 12`, trained on a lent H200 by scripts/gpu_train_teachers.sh and evaluated here; the
pool's third, models/resnet56_cifar10.pt (85.22), is `--arch resnet56_cifar10 --epochs 12 --threads 1` on this CPU
(5,221 s). Any:

    python scripts/train_teacher.py --arch preresnet20_cifar10 --data ../shared/data/cifar10-jpeg \
        --epochs 40 --out my_models/

Writes <out>/<arch>.pt (the state_dict: load it with model=pytorchcv model.arch=<arch> model.checkpoint=...) and
<out>/<arch>.json (test top-1, normalization, epochs, sha256), both atomically; it resumes after the last finished
epoch from <out>/.<arch>.resume.pt when rerun with the same arguments. The recipe is the shared
teacher's (shared/models/README.md): SGD Nesterov 0.9, weight decay 5e-4, batch 128, one-cycle learning rate
(peak 0.2), random crop (pad 4) and horizontal flip, channels_last; normalization with the GDFQ lineage's
CIFAR-10 constants (CIFAR-100: pass --mean/--std).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of an ImageFolder split as one uint8 tensor [N, 3, H, W] (CIFAR fits in memory)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"train_teacher: error: no class folders under {folder}")
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as img:
                images.append(torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
                              .view(img.height, img.width, 3).permute(2, 0, 1))
            labels.append(index)
    return torch.stack(images), torch.tensor(labels), classes


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    x = x.float().div_(255)
    return ((x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1))
            / torch.tensor(std, device=x.device).view(1, 3, 1, 1))


def augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random crop with 4 pixels of zero padding and a horizontal flip, per image. The draws come from the CPU
    generator `rng` wherever x lies, so a run makes the same draws on any device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n), generator=rng)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 3, h, w + 8)
    out = padded.gather(2, rows.to(x.device))
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 3, h, w)
    out = out.gather(3, cols.to(x.device))
    flip = (torch.rand(n, generator=rng) < 0.5).to(x.device)
    out[flip] = out[flip].flip(3)
    return out


@torch.inference_mode()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, mean, std, batch: int = 500) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(normalize(x[i:i + batch].to(device), mean, std).contiguous(memory_format=torch.channels_last))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Resumable:
    """Training state (the parts' state_dicts, the random generators, epoch, seconds, devices) saved atomically
    after every epoch to <out>/.<arch>.resume.pt; a rerun with the same recipe continues from it, since a session
    may end at any time. The recipe is every argument but where things run and lie: --threads, --device and --out
    aside, files and folders compared by name, so a state trained on a lent GPU from a copy of the train split
    resumes here. Another recipe refuses to resume rather than mix two."""

    _WHERE = ("threads", "device", "out")

    def __init__(self, path: Path, args, prog: str, rng: torch.Generator, **parts):
        self.path, self.prog, self.rng, self.parts = path, prog, rng, parts
        self.args = {k: v.name if isinstance(v, Path) else str(v) for k, v in vars(args).items()
                     if k not in self._WHERE}
        self.device = getattr(args, "device", "cpu")
        self.devices: list[str] = []

    def restore(self) -> tuple[int, float]:
        """(epochs done, seconds spent) from the saved state, (0, 0.0) without one."""
        if not self.path.exists():
            return 0, 0.0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state["args"] != self.args:
            raise SystemExit(f"{self.prog}: error: {self.path} was written with other arguments; delete it or "
                             f"rerun with {state['args']}")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        self.devices = state.get("devices", ["cpu"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed after epoch {state['epoch']} ({state['seconds']:.0f} s)", file=sys.stderr)
        return state["epoch"], state["seconds"]

    def save(self, epoch: int, seconds: float) -> None:
        state = {name: part.state_dict() for name, part in self.parts.items()}
        if device_name(self.device) not in self.devices:
            self.devices.append(device_name(self.device))
        state.update(rng=self.rng.get_state(), torch_rng=torch.get_rng_state(), epoch=epoch, seconds=seconds,
                     args=self.args, devices=self.devices)
        write_atomic(self.path, lambda tmp: torch.save(state, tmp))

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def device_name(device: str) -> str:
    """'cpu', or the accelerator's name ('cuda: NVIDIA H200'), for the facts file."""
    if torch.device(device).type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return str(device)


def check_device(device: str, prog: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"{prog}: error: --device={device!r} is not a torch device; choose cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"{prog}: error: --device={device!r}; choose cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: error: --device={device!r} but torch sees no CUDA device; choose cpu")
    return dev


def load_splits(data: Path, prog: str):
    """(train images, train labels, classes, test images or None, test labels or None). Without a test/ split the
    run trains only: its last epoch's state stays in the resume file, and a rerun where test/ exists evaluates it
    and writes the weights (train on a lent machine that holds only the train split, evaluate here)."""
    x_train, y_train, classes = load_split(data / "train")
    if not (data / "test").is_dir():
        return x_train, y_train, classes, None, None
    x_test, y_test, test_classes = load_split(data / "test")
    if classes != test_classes:
        raise SystemExit(f"{prog}: error: train/ and test/ have different class folders")
    return x_train, y_train, classes, x_test, y_test


def no_test_split(resumable: "Resumable", data: Path, prog: str) -> int:
    print(f"{prog}: trained; {data / 'test'} does not exist, so the state stays in {resumable.path}: rerun with the "
          "same recipe where the test split exists to evaluate it and write the weights", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="preresnet20_cifar10",
                    help="a pytorchcv CIFAR architecture, or a dfqbench stand-in (seq_conv1d_cifar10)")
    ap.add_argument("--data", type=Path, required=True, help="folder with train/ and test/ ImageFolder splits")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2, help="one-cycle peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (training; the test top-1 is computed on the "
                                                    "device the evaluating run uses)")
    ap.add_argument("--mean", type=float, nargs=3, default=MEAN)
    ap.add_argument("--std", type=float, nargs=3, default=STD)
    args = ap.parse_args(argv)
    if args.epochs < 1:
        raise SystemExit(f"train_teacher: error: --epochs={args.epochs} must be at least 1")
    from pytorchcv.model_provider import _models, get_model

    from dfqbench.archs import ARCHS, STAND_INS

    if args.arch not in _models and args.arch not in ARCHS:
        raise SystemExit(f"train_teacher: error: unknown pytorchcv architecture {args.arch!r} (dfqbench stand-ins: "
                         f"{', '.join(ARCHS)})")
    device = check_device(args.device, "train_teacher")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = torch.Generator().manual_seed(args.seed)
    x_train, y_train, classes, x_test, y_test = load_splits(args.data, "train_teacher")
    x_train, y_train = x_train.to(device), y_train.to(device)
    ours = args.arch in ARCHS
    model = ARCHS[args.arch](num_classes=len(classes)) if ours else get_model(args.arch, pretrained=False)
    model = model.to(device, memory_format=torch.channels_last)
    steps_per_epoch = len(x_train) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    args.out.mkdir(parents=True, exist_ok=True)
    resumable = Resumable(args.out / f".{args.arch}.resume.pt", args, "train_teacher", rng, model=model, opt=opt,
                          sched=sched)
    start, spent = resumable.restore()
    for epoch in range(start, args.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=rng)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = normalize(augment(x_train[idx], rng), args.mean, args.std).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        spent += time.perf_counter() - t0
        resumable.save(epoch + 1, spent)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.detach().item():.3f} ({spent:.0f} s)", file=sys.stderr,
              flush=True)
    if x_test is None:
        return no_test_split(resumable, args.data, "train_teacher")
    seconds = spent
    top1 = accuracy(model, x_test, y_test, args.mean, args.std)
    weights = args.out / f"{args.arch}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda tmp: torch.save(state, tmp))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    layout = "dfqbench.archs layout" if ours else "pytorchcv layout"
    source = f"{layout}, trained from scratch by scripts/train_teacher.py"
    if args.arch in STAND_INS:
        source = f"STAND-IN for {STAND_INS[args.arch]}. {source}"
    facts = {"arch": args.arch, "source": source,
             "epochs": args.epochs, "test_top1": round(top1, 2), "normalize_mean": list(args.mean),
             "normalize_std": list(args.std), "sha256": sha, "train_seconds": round(seconds, 1),
             "seed": args.seed, "data": str(args.data),
             "recipe": {"optimizer": "SGD nesterov momentum 0.9, weight decay 5e-4", "batch_size": args.batch_size,
                        "lr": f"one-cycle, peak {args.lr}", "augment": "random crop (pad 4) + horizontal flip",
                        "threads": args.threads, "trained_on": resumable.devices}}
    write_atomic(args.out / f"{args.arch}.json", lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=1)))
    resumable.finish()
    print(f"{args.arch}: test top-1 {top1:.2f} after {args.epochs} epochs ({seconds:.0f} s) -> {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
