"""The papers' reported numbers: parsed from the seed document's baseline tables, never retyped.

`python -m dfqbench.reported SEED.md results/reported.csv` rewrites the CSV from the document; extra rows that
the seed lacks (collected with their provenance from the methods' repositories) live in
`results/reported_extra.csv`, with a `source` column.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "dataset", "table", "method", "method_label", "venue", "wbit", "abit", "mixed_precision",
           "fp32_top1", "top1", "notes", "source"]

# Seed table titles -> (dfqbench model name, data set). Models without a config yet get the pytorchcv name.
_TABLES = {
    "ResNet-20 (CIFAR-10 Classification)": ("resnet20_cifar10", "cifar10"),
    "ResNet-20 (CIFAR-100 Classification)": ("resnet20_cifar100", "cifar100"),
    "ResNet-18 (ImageNet Classification)": ("resnet18", "imagenet"),
    "ResNet-50 (ImageNet Classification)": ("resnet50", "imagenet"),
    "ResNet-101 (ImageNet Classification)": ("resnet101", "imagenet"),
    "MobileNet-V1 (ImageNet Classification)": ("mobilenet_w1", "imagenet"),
    "MobileNet-V2 (ImageNet Classification)": ("mobilenetv2_w1", "imagenet"),
    "VGG16 (ImageNet Classification)": ("vgg16", "imagenet"),
    "VGG16-BN (ImageNet Classification)": ("bn_vgg16", "imagenet"),
    "Inception-V3 (ImageNet Classification)": ("inceptionv3", "imagenet"),
    "SqueezeNet (ImageNet Classification)": ("squeezenet", "imagenet"),
    "ShuffleNet (ImageNet Classification)": ("shufflenet", "imagenet"),
    "DenseNet-121 (ImageNet Classification)": ("densenet121", "imagenet"),
}


def method_key(label: str) -> str:
    """'GDFQ' -> 'gdfq', 'AAC+ABN' -> 'aac_abn', 'AutoReCon' -> 'autorecon'."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def _bits(cell: str) -> tuple[int, bool]:
    mixed = "(MP)" in cell
    return int(re.sub(r"\(MP\)", "", cell).strip()), mixed


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_seed(text: str, source: str = "seed") -> pd.DataFrame:
    rows, table = [], None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            table = (title, *_TABLES[title]) if title in _TABLES else None
            if table is None and "Classification" in title:
                raise ValueError(f"seed table {title!r} has no model mapping in dfqbench.reported._TABLES")
            continue
        if table is None or not line.startswith("|"):
            continue
        cells = _cells(line)
        if cells[0] in ("Method", "-") or set(cells[0]) <= {"-", ":"} or len(cells) < 7:
            continue
        wbit, mixed_w = _bits(cells[2])
        abit, mixed_a = _bits(cells[3])
        rows.append({"model": table[1], "dataset": table[2], "table": table[0], "method": method_key(cells[0]),
                     "method_label": cells[0], "venue": cells[1], "wbit": wbit, "abit": abit,
                     "mixed_precision": mixed_w or mixed_a, "fp32_top1": float(cells[4]), "top1": float(cells[5]),
                     "notes": cells[6], "source": source})
    return pd.DataFrame(rows, columns=COLUMNS)


def load_reported(results_dir: Path) -> pd.DataFrame:
    frames = [pd.read_csv(p, keep_default_na=False) for p in
              (results_dir / "reported.csv", results_dir / "reported_extra.csv") if p.exists()]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    return df.astype({"wbit": int, "abit": int, "fp32_top1": float, "top1": float})


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m dfqbench.reported SEED.md OUT.csv")
    seed, out = Path(argv[0]), Path(argv[1])
    df = parse_seed(seed.read_text(), source=f"seed:{seed.name}")
    df.to_csv(out, index=False)
    print(f"{len(df)} reported rows from {seed} -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
