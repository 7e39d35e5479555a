"""Heatmaps of causal traces: one PNG per relation, rows = position groups, columns = layers.

A figure holds one row of panels per corruption and one panel per restored kind (residual, MLP,
attention), coloured by the correct answer's mean probability after the restoration (ROME's
colouring); each panel's title gives the clean and corrupted probabilities it lies between.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: Panel colour maps per kind, as in ROME's figures.
CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


def relation_heatmap(relation: str, summary: Mapping[str, Mapping], path: Path, window: int = 1) -> Path:
    """Draw `summary` (corruption -> {"restored": {kind: [groups][columns]}, "groups", "clean",
    "corrupted", "n"}) for one relation into `path`."""
    corruptions = list(summary)
    kinds = ["resid", "mlp", "attn"]
    fig, axes = plt.subplots(
        len(corruptions), len(kinds), figsize=(4.2 * len(kinds), 2.0 + 1.9 * len(corruptions)), squeeze=False
    )
    for row, corruption in enumerate(corruptions):
        part = summary[corruption]
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            values = np.array(part["restored"][kind], dtype=float)
            image = ax.imshow(
                np.ma.masked_invalid(values),
                cmap=CMAPS[kind],
                vmin=0.0,
                vmax=max(1e-6, float(part["clean"])),
                aspect="auto",
            )
            n_cols = values.shape[1]
            labels = ["emb", *range(n_cols - 1)] if kind == "resid" else list(range(n_cols))
            ax.set_xticks(range(n_cols), [str(x) for x in labels])
            ax.set_yticks(range(len(part["groups"])), part["groups"])
            suffix = f", window {window}" if kind != "resid" and window > 1 else ""
            ax.set_title(
                f"{corruption}: {TITLES[kind]}{suffix}\nclean {part['clean']:.2f}, corrupted {part['corrupted']:.2f}",
                fontsize=8,
            )
            ax.set_xlabel("layer" if kind != "resid" else "layer (emb: first layer's input)", fontsize=7)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    n = next(iter(summary.values()))["n"] if summary else 0
    fig.suptitle(f"{relation}: p(correct answer) with one state group restored ({n} probes)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
