"""Thumbnail grids: a set of images with a caption under each, as one PNG.

Used where people look at pictures rather than numbers: the most confident mistakes of an
evaluation, the suspected label errors of a new batch. The PNG is a stage output, an MLflow
artifact, and (inlined) a Prefect artifact, so it is kept small: at most ``MAX_TILES`` thumbnails,
a few columns wide, each scaled to a fixed tile.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Enough to see a pattern in the mistakes without making the PNG heavy.
MAX_TILES = 48


def image_grid(path: Path, images: Sequence[np.ndarray], captions: Sequence[str], title: str, columns: int = 8) -> Path:
    """Draw ``images`` (uint8, HxW grey or HxWx3 RGB) in a grid with one caption each.

    With no images the PNG says so, so a report never points at a missing file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    images, captions = list(images)[:MAX_TILES], list(captions)[:MAX_TILES]
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        grey = image.ndim == 2 or image.shape[-1] == 1
        ax.imshow(image.squeeze() if grey else image, cmap="gray" if grey else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    if not images:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=12)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def png_data_uri(path: Path) -> str:
    """The PNG inlined as a ``data:`` URI, for artifacts viewed where the file is not served."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
