"""SpaceNet's analysis figures (paper Sec. 6) as run artifacts; kept apart so spacenet.py stays the algorithm.

Fig. 4: hidden activations of 100 test samples of task 1 (50 per class) after training it.
Fig. 5: a task's connections between the two hidden layers, on its selected neurons, before and after
        training (random at allocation, compacted by drop/grow).
Fig. 6: connections per input pixel for each task (first weight layer, rows summed, reshaped to the image).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..plots import _plt


def _block(method, l: int, t: int) -> torch.Tensor:
    """Task-t connections of weight layer l between the task's selected neurons."""
    rows, cols = method.selected(l + 1).nonzero().squeeze(1), method.net.cols(l, method.selected(l)).nonzero().squeeze(1)
    return method.layers[l].owned_by(t)[rows][:, cols].cpu()


def capture_allocation(method, t: int) -> None:
    """Fig. 5 (a): the second task's connections between the hidden layers as allocated."""
    if t == min(1, len(method.stream.tasks) - 1) and len(method.layers) > 2:
        method.figdata["fig5"] = {"task": t, "before": _block(method, 1, t)}


@torch.no_grad()
def capture_trained(method, task, t: int) -> None:
    """Fig. 5 (b) after the same task's training; Fig. 4 after the first task (MLPs)."""
    fig5 = method.figdata.get("fig5")
    if fig5 is not None and fig5["task"] == t:
        fig5["after"] = _block(method, 1, t)
    model = method.model
    if t == 0 and hasattr(model, "act"):  # 50 test samples of each of the task's first two classes
        y = task.test.y
        idx = torch.cat([(y == c).nonzero().squeeze(1)[:50] for c in task.classes[:2]])
        acts = []  # the MLP applies its one activation module after every hidden layer
        hook = model.act.register_forward_hook(lambda mod, i, o: acts.append(o.detach().cpu()))
        was_training = model.training
        model.eval()
        model.features(task.test.x[idx])
        model.train(was_training)
        hook.remove()
        method.figdata["fig4"] = acts


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
        fig.subplots_adjust(left=0.07, right=0.97, bottom=0.13, top=0.84, wspace=0.2)
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
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.84, wspace=0.3)
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
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.8, wspace=0.1, hspace=0.3)
        fig.savefig(folder / "spacenet_fig6_input_connections.png", dpi=100)
        plt.close(fig)
