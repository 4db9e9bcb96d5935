"""Adam-mini's partition of the baby GPT, drawn: each parameter tensor of the embeddings and of
the first block as an image in which every Adam-mini block has its own color (one second-moment
value each). tools/partition_figure.py draws the baby GPT's."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import optim  # noqa: E402
from plots.figures import save_figure  # noqa: E402


def block_ids(rule, shape):
    """A tensor of `shape` holding each element's Adam-mini block number under `rule`."""
    ids, first = [], 0
    for n_blocks, block_numel in optim.block_layout(rule, shape):
        ids.append(torch.arange(first, first + n_blocks).repeat_interleave(block_numel))
        first += n_blocks
    return torch.cat(ids).view(shape)


def draw_partition(model, names, path, title):
    """One panel per named parameter: the tensor (rows = output neurons or tokens) colored by
    block, so a student sees per-head, per-neuron, per-token and whole-tensor blocks."""
    params, rules = dict(model.named_parameters()), optim.block_rules(model)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 6.5),
                             gridspec_kw={"width_ratios": [max(1, min(4, params[n].shape[-1] / 64))
                                                           for n in names]})
    for ax, name in zip(axes, names):
        p = params[name]
        ids = block_ids(rules[p], tuple(p.shape))
        image = ids.view(-1, 1) if ids.dim() == 1 else ids      # a vector as one column
        ax.imshow(image % 20, cmap="tab20", vmin=0, vmax=19, aspect="auto",
                  interpolation="nearest")
        rule = rules[p] if isinstance(rules[p], str) else f"{rules[p][0]}, {rules[p][1]} heads"
        n_blocks = int(ids.max()) + 1
        ax.set_title(f"{name.removeprefix('transformer.')}\n{tuple(p.shape)}, {rule}\n"
                     f"{n_blocks:,} block{'s' if n_blocks > 1 else ''}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return save_figure(fig, path)
