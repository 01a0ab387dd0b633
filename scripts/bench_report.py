"""The benchmarks' one way to finish: print the markdown report and, with --out, write it (the committed copy)."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], out: str | None, echo: bool = True) -> None:
    if echo:
        print("\n".join(lines))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
