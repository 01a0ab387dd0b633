"""Pack an ImageFolder split into one .npz (the files' bytes, unchanged) and unpack it again: a lent GPU machine
takes the working tree by size on disk, where 50,000 small JPEGs cost 4 KiB each but 46 MB packed.

    python scripts/pack_split.py pack ../shared/data/cifar10-jpeg/train .gpu/cifar10-train-jpeg.npz
    python scripts/pack_split.py unpack .gpu/cifar10-train-jpeg.npz .gpu/cifar10-jpeg/train
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def pack(folder: Path, archive: Path) -> int:
    files = sorted(p for p in folder.glob("*/*") if p.is_file())
    if not files:
        raise SystemExit(f"pack_split: error: no <class>/<file> under {folder}")
    blobs = [p.read_bytes() for p in files]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    names = np.array([p.relative_to(folder).as_posix() for p in files])
    np.savez(archive, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, names=names)
    return len(files)


def unpack(archive: Path, folder: Path) -> int:
    with np.load(archive) as z:
        data, offsets, names = z["data"], z["offsets"], z["names"]
    for k, name in enumerate(names):
        path = folder / str(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[offsets[k]:offsets[k + 1]].tobytes())
    return len(names)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("pack", "unpack"):
        raise SystemExit("usage: pack_split.py pack FOLDER ARCHIVE.npz | unpack ARCHIVE.npz FOLDER")
    n = (pack if argv[0] == "pack" else unpack)(Path(argv[1]), Path(argv[2]))
    print(f"pack_split: {argv[0]}ed {n} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
