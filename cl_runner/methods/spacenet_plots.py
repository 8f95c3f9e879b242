"""SpaceNet's analysis figures (paper Sec. 6) as run artifacts; kept apart so spacenet.py stays the algorithm.

Fig. 4: hidden activations of 100 test samples of task 1 (50 per class) after training it.
Fig. 5: a task's connections between the two hidden layers, on its selected neurons, before and after
        training (random at allocation, compacted by drop/grow).
Fig. 6: connections per input pixel for each task (first weight layer, rows summed, reshaped to the image).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..plots import _plt


def write_figures(method, folder: Path) -> None:
    plt = _plt()
    fig4, fig5 = method.figdata.get("fig4"), method.figdata.get("fig5")
    if fig4:
        fig, axes = plt.subplots(1, len(fig4), figsize=(4.5 * len(fig4), 4), squeeze=False)
        for i, (ax, a) in enumerate(zip(axes[0], fig4)):
            im = ax.imshow(a.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
            active = 100.0 * (a > 0).float().mean().item()
            ax.set(title=f"hidden layer {i + 1} ({active:.1f}% active)", xlabel="neuron", ylabel="test sample")
            fig.colorbar(im, ax=ax)
        fig.suptitle("Fig. 4: activations on task 1 (first 50 samples: first class, then second)")
        fig.tight_layout()
        fig.savefig(folder / "spacenet_fig4_activations.png", dpi=100)
        plt.close(fig)
    if fig5 and "after" in fig5:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
        for ax, when in zip(axes, ("before", "after")):
            m = fig5[when]
            ax.imshow(m.numpy(), cmap="Greys", interpolation="nearest")
            per_neuron = (m.sum(1) > 0).sum().item()
            ax.set(title=f"{when}: {int(m.sum())} connections into {per_neuron} neurons",
                   xlabel="selected neurons of hidden layer 1", ylabel="selected neurons of hidden layer 2")
        fig.suptitle(f"Fig. 5: connections of task {fig5['task'] + 1} between the hidden layers")
        fig.tight_layout()
        fig.savefig(folder / "spacenet_fig5_connections.png", dpi=100)
        plt.close(fig)
    first, shape = method.layers[0], method.stream.input_shape
    if first.weight.dim() == 2 and len(shape) == 3 and shape[0] == 1:  # an MLP on grey images
        T = int(method.task) + 1
        cols = min(T, 5)
        fig, axes = plt.subplots(math.ceil(T / cols), cols, figsize=(2.6 * cols, 2.6 * math.ceil(T / cols)),
                                 squeeze=False)
        for t, ax in enumerate(axes.flat):
            ax.axis("off")
            if t < T:
                counts = first.owned_by(t).sum(0).view(shape[1:]).cpu().numpy()  # connections per input
                ax.imshow(counts, cmap="hot", interpolation="nearest")
                ax.set_title(f"task {t + 1}", fontsize=9)
        fig.suptitle(f"Fig. 6: connections per input pixel ({'SpaceNet' if method.hp.rewire else 'static sparse'})")
        fig.tight_layout()
        fig.savefig(folder / "spacenet_fig6_input_connections.png", dpi=100)
        plt.close(fig)
