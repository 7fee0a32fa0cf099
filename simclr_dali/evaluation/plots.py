"""Pictures of a run: training curves, a 2-D map of test embeddings, a retrieval grid.

    python plots.py --run runs/digits          # training_curves.png from metrics.jsonl

evaluate.py draws all three beside the run (its --no-plots skips them). Everything renders with the
Agg backend, at fixed figure sizes (FIGURE_SIZES), so a PNG's pixel size depends only on its layout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from simclr_dali.errors import UserError, exit_on_user_error  # noqa: E402

DPI = 100
STYLE = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "figure.facecolor": "white"}
CURVE_PANEL = (4.0, 3.2)  # inches per training-curve panel
MAP_SIZE = (13.0, 6.0)  # the two embedding maps side by side, legend on the right
CELL = 1.25  # inches per retrieval-grid image
NEIGHBOURS = 5
BLUE, ORANGE, GREEN, RED = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"


def save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(path)
    return path


# -- training curves --------------------------------------------------------------------------------
def read_metrics(path: Path, fix: str = "delete what is damaged") -> dict[str, list[dict]]:
    """Records of metrics.jsonl by kind, in step order; a step logged twice (a resume after a crash
    repeats the epoch it crashed in) keeps its last record. A last line cut short by a kill is left out."""
    from simclr_dali.readback import read_jsonl

    by_key = {}
    for record in read_jsonl(Path(path), fix):
        by_key[(record.get("kind"), record.get("step"))] = record
    kinds: dict[str, list[dict]] = {}
    for (kind, _), record in sorted(by_key.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
        kinds.setdefault(kind, []).append(record)
    return kinds


def training_curves(metrics: Path, out: Path, kinds: dict[str, list[dict]] | None = None) -> Path:
    """Loss, learning rate and images/s against the step (plus online kNN top-1 when logged); `kinds`:
    read_metrics(metrics), when read already."""
    kinds = read_metrics(metrics) if kinds is None else kinds
    steps, epochs, knn = kinds.get("step", []), kinds.get("epoch", []), kinds.get("knn", [])
    if not steps and not epochs:
        raise UserError(f"{metrics} holds no training records yet")
    col = lambda rs, key: np.array([r[key] for r in rs], dtype=float)  # noqa: E731
    panels = 4 if knn else 3
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, panels, figsize=(CURVE_PANEL[0] * panels, CURVE_PANEL[1]), layout="constrained")
        ax = axes[0]
        if steps:
            ax.plot(col(steps, "step"), col(steps, "loss"), color=BLUE, alpha=0.35, lw=1, label="logged step")
        if epochs:
            ax.plot(col(epochs, "step"), col(epochs, "loss"), "o-", color=BLUE, ms=3.5, lw=1.8, label="epoch mean")
        ax.set(title="NT-Xent loss", xlabel="step")
        ax.legend(frameon=False, fontsize=8)
        rs = steps or epochs
        axes[1].plot(col(rs, "step"), col(rs, "lr"), color=ORANGE, lw=1.8)
        axes[1].set(title="learning rate", xlabel="step")
        axes[1].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # no offset text
        ax = axes[2]
        if steps:
            ax.plot(col(steps, "step"), col(steps, "images_per_s"), color=GREEN, alpha=0.35, lw=1)
        if epochs:
            rates = col(epochs, "images_per_s")
            ax.plot(col(epochs, "step"), rates, "o-", color=GREEN, ms=3.5, lw=1.8)
            ax.axhline(np.median(rates), color="grey", ls="--", lw=1)
            ax.annotate(f"median {np.median(rates):,.0f} img/s", (0.02, 0.04), xycoords="axes fraction",
                        fontsize=8, color="dimgrey")
        ax.set(title="throughput (images/s)", xlabel="step", ylim=(0, None))
        if knn:
            ax = axes[3]
            ax.plot(col(knn, "step"), 100 * col(knn, "knn_top1"), "o-", color=RED, ms=4, lw=1.8)
            ax.annotate(f"last {100 * knn[-1]['knn_top1']:.1f}%", (col(knn, "step")[-1], 100 * knn[-1]["knn_top1"]),
                        textcoords="offset points", xytext=(-8, 8), ha="right", fontsize=8)
            ax.set(title="online kNN top-1 (%)", xlabel="step", ylim=(0, 100))
        if epochs:  # an epoch axis on top of each panel
            per_epoch = epochs[-1]["step"] / epochs[-1]["epoch"]
            for ax in axes:
                top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
                top.set_xlabel("epoch", fontsize=8)
                top.xaxis.set_major_locator(MaxNLocator(integer=True))
                top.tick_params(labelsize=8)
        for ax in axes:
            ax.set_xlim(left=0)
        fig.suptitle(f"training: {Path(metrics).parent.name}", fontsize=12)
    return save(fig, out)


# -- 2-D map of embeddings -------------------------------------------------------------------------
DRAWN = ("t-SNE", "PCA")  # what project_2d names when it drew a map (else why it could not)


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """t-SNE of the features' directions (what the cosine kNN sees) about their mean direction, reduced
    to 50 principal components; PCA alone below 10 points. Centring matters at random init, where all
    features point almost the same way and the plain cosine map collapses."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    if not np.isfinite(x).all():
        return np.zeros((len(x), 2)), "non-finite features"
    x = unit(x)
    x = x - x.mean(0)
    if np.abs(x).max() <= 1e-9:  # every image has the same direction (a collapsed or dead network): PCA
        return np.zeros((len(x), 2)), "all features equal"  # would divide by zero and t-SNE crash on it
    x = unit(x)
    if len(x) < 3:  # nothing to project: a row of points
        return np.column_stack([np.arange(len(x)), np.zeros(len(x))]).astype(float), "PCA"
    if len(x) < 10:
        return PCA(n_components=2, random_state=seed).fit_transform(x), "PCA"
    x = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "t-SNE"


def class_colours(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def embedding_map(features: dict, labels: np.ndarray, classes: list[str], out: Path, *,
                  scores: dict | None = None, max_points: int = 2000, seed: int = 0) -> Path:
    """One panel per backbone ({title: (N, F) features of the same images}), points coloured by class."""
    labels = np.asarray(labels)
    keep = np.arange(len(labels))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), max_points, replace=False))
    n_classes = int(labels.max()) + 1
    names = [classes[c] if c < len(classes) else str(c) for c in range(n_classes)]
    colours = class_colours(n_classes)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(1, len(features), figsize=MAP_SIZE, layout="constrained", squeeze=False)
        methods = []
        for ax, (title, x) in zip(axes[0], features.items()):
            xy, method = project_2d(np.asarray(x, dtype=np.float64)[keep], seed)
            methods.append(method)
            y = labels[keep]
            size = 10 if len(keep) > 1000 else 22 if len(keep) > 200 else 45
            for c in range(n_classes):
                m = y == c
                ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colours[c], alpha=0.8, linewidths=0, label=names[c])
            score = f"  (kNN top-1 {scores[title]:.1%})" if scores and title in scores else ""
            ax.set_title(f"{title}{score}" + ("" if method in DRAWN else f"\n{method}: nothing to draw"))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(visible=True, color="lightgrey")
        if n_classes <= 30:
            fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right center", frameon=False,
                       markerscale=1.6, title="class")
        method = next((m for m in methods if m in DRAWN), "no map")
        fig.suptitle(f"{method} of {len(keep)} test embeddings, coloured by class", fontsize=12)
    return save(fig, out)


# -- retrieval grid -------------------------------------------------------------------------------
def display_image(source, i: int, max_side: int = 160) -> np.ndarray:
    """Image i of a source as HWC uint8 RGB for display: the array itself, or the file via PIL."""
    if not source.encoded:
        return np.asarray(source.images[i])
    from PIL import Image

    try:
        with Image.open(source.files[i]) as im:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side))
            return np.asarray(im)
    except OSError:  # unreadable for PIL though DALI decoded it: show a grey tile rather than fail
        return np.full((max_side, max_side, 3), 128, np.uint8)


def pick_queries(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to n query indices, spread over the classes (round robin), deterministic from the seed."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    picked = []
    while len(picked) < min(n, len(labels)):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return np.array(picked, dtype=int)


def show(ax, image: np.ndarray, title: str = "", colour: str | None = None) -> None:
    small = max(image.shape[:2]) <= 64
    ax.imshow(image, interpolation="nearest" if small else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour:
            spine.set_color(colour)
            spine.set_linewidth(3)
    if title:
        ax.set_title(title, fontsize=8, color=colour or "black", pad=3)


def retrieval_grid(query_x, query_y: np.ndarray, gallery_x, gallery_y: np.ndarray, query_src, gallery_src,
                   out: Path, *, n_queries: int = 0, seed: int = 0) -> Path:
    """Test images (left column) and their NEIGHBOURS nearest training images by cosine similarity,
    framed green where the class matches and red where it does not. n_queries=0: one per class, 6-10."""
    import torch

    from simclr_dali.models.features import Bank

    n_queries = n_queries or min(max(len(np.unique(query_y)), 6), 10)
    queries = pick_queries(np.asarray(query_y), n_queries, seed)
    k = min(NEIGHBOURS, len(gallery_y))
    top_sim, top_idx = Bank(torch.as_tensor(gallery_x), torch.device("cpu"), memory_mb=512).nearest(
        torch.as_tensor(query_x)[queries], k)  # the gallery a part at a time, never normalised whole
    classes = query_src.classes or gallery_src.classes
    name = lambda c: classes[c] if 0 <= c < len(classes) else str(c)  # noqa: E731
    rows, cols = len(queries), k + 2  # query, a narrow gap, the neighbours
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(rows, cols, figsize=(CELL * (k + 1.25) + 0.3, CELL * rows + 0.6), squeeze=False,
                                 gridspec_kw={"wspace": 0.08, "hspace": 0.35, "width_ratios": [1, 0.25] + [1] * k})
        for ax in axes[:, 1]:
            ax.axis("off")
        axes = np.delete(axes, 1, axis=1)
        for r, q in enumerate(queries):
            show(axes[r, 0], display_image(query_src, q), f"query: {name(query_y[q])}", colour="black")
            for c in range(k):
                g = int(top_idx[r, c])
                hit = gallery_y[g] == query_y[q]
                show(axes[r, c + 1], display_image(gallery_src, g), f"{name(gallery_y[g])}  {top_sim[r, c]:.2f}",
                     colour=GREEN if hit else RED)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.7 / (CELL * rows + 0.6))
        fig.suptitle(f"test queries and their {k} nearest training images\n(cosine similarity; "
                     f"green: same class, red: another)", fontsize=10)
    return save(fig, out)


# -- command line ------------------------------------------------------------------------------------
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw a run's training curves (loss, lr, images/s, kNN).")
    parser.add_argument("--run", required=True, help="the training run's output folder (holds metrics.jsonl)")
    parser.add_argument("--out", default="", help="PNG to write (default: RUN/training_curves.png)")
    args = parser.parse_args(argv)
    metrics = Path(args.run) / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{args.run} has no metrics.jsonl: pass the --out folder of a training run")
    out = training_curves(metrics, Path(args.out) if args.out else Path(args.run) / "training_curves.png")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
