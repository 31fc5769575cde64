"""scikit-learn's digits (1,797 8x8 greyscale images, 10 classes) as a folder of PNG files: a
dataset that is not Fashion-MNIST, available offline, for trying "your own data".

The images are upscaled (nearest neighbour, so still blocky) and saved alternately in RGB and
palette (P) mode, so a folder has the variety of a real export. ``python -m tasks.data.digits
OUT [--size 32] [--per-class N] [--offset K]`` writes ``OUT/<digit>/<index>.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = tuple(f"digit_{d}" for d in range(10))


def write_digits(out: Path, size: int = 32, per_class: int | None = None, offset: int = 0) -> dict[str, int]:
    """Write images ``offset .. offset + per_class`` of each class; returns the count per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[str, int] = {}
    for digit, name in enumerate(CLASSES):
        indices = np.flatnonzero(digits.target == digit)
        chosen = indices[offset : None if per_class is None else offset + per_class]
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in chosen:
            grey = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            img = Image.fromarray(255 - grey, mode="L").resize((size, size), Image.Resampling.NEAREST)
            img = img.convert("RGB") if i % 2 == 0 else img.convert("P")
            img.save(out / name / f"{i:04d}.png")
        counts[name] = len(chosen)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--offset", type=int, default=0)
    args = parser.parse_args()
    counts = write_digits(args.out, args.size, args.per_class, args.offset)
    print(f"{sum(counts.values())} images in {args.out}: {counts}")


if __name__ == "__main__":
    main()
