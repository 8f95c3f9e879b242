"""What DGM shows of itself: the generator's capacity after each task (reserved vs free weights or channels, per
layer) and its figures — the generator's size per task (the paper's Fig. 2, DGMw vs DGMa growth) and a grid of
generated samples per class after the last task."""
from __future__ import annotations

import torch


@torch.no_grad()
def capacity(G) -> dict:
    """Per generator layer: reserved and free weights (DGMw) or channels (DGMa), and the layer's size."""
    out = {}
    for l, (conv, r) in enumerate(zip(G.convs, G.reserved)):
        used, total = int(r.sum()), r.numel()
        unit = "conn" if G.masks == "weights" else "units"
        out[f"gen{l + 1}"] = {f"{unit}_reserved": used, f"{unit}_free": total - used,
                              f"{unit}_used_pct": 100.0 * used / total, "channels": conv.weight.shape[1],
                              "params": conv.weight.numel()}
    return out


@torch.no_grad()
def write_figures(method, folder) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    growth, name = method.growth, "DGMw" if method.hp.masks == "weights" else "DGMa"
    if not growth:
        return
    tasks = list(range(1, len(growth) + 1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([0, *tasks], [method.start_params, *(g["gen_params"] for g in growth)], marker="o")
    a.set(xlabel="tasks learned", ylabel="generator parameters (masked layers)",
          title=f"{name}: generator size")
    for l in range(len(growth[0]["sizes"])):
        b.plot([0, *tasks], [method.start_sizes[l], *(g["sizes"][l] for g in growth)], marker="o", label=f"layer {l + 1}")
    b.set(xlabel="tasks learned", ylabel="output channels", title="channels per layer")
    b.legend()
    fig.tight_layout()
    fig.savefig(folder / "generator_growth.png", dpi=120)
    plt.close(fig)

    G, per = method.generator, 8
    G.eval()
    rows = []
    with torch.random.fork_rng(devices=[]):  # the same noise in every run's grid; the run's RNG is untouched
        torch.manual_seed(0)
        for task in method.stream.tasks[:method.done]:
            c = task.classes[0]
            lab = torch.full((per,), c, device=method.device)
            rows.append(G(G.noise(lab), task.id, c, method.hp.s_max, binary=True)[0].cpu())
    G.train()
    fig, axes = plt.subplots(len(rows), per, figsize=(per * 0.9, len(rows) * 0.9), squeeze=False)
    for i, imgs in enumerate(rows):
        for j, img in enumerate(imgs):
            im = ((img + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
            axes[i][j].imshow(im.squeeze(-1) if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None)
            axes[i][j].axis("off")
        axes[i][0].text(-0.15, 0.5, str(method.stream.tasks[i].classes[0]), transform=axes[i][0].transAxes,
                        ha="right", va="center", fontsize=8)
    fig.suptitle(f"{name}: generated samples per class (rows) after task {method.done}", fontsize=9)
    fig.savefig(folder / "generated_samples.png", dpi=120)
    plt.close(fig)
