"""
g-SNR at initialisation: the learning-rate scale SGD-SaI freezes for each parameter block, under
each scale rule, beside the signal-to-noise ratio of the gradient across the examples of a batch.

    python snr.py                     # nanoGPT baby model, one batch of 32 sequences
    python snr.py --trainer=vit       # the ViT on its data set
    python snr.py --batch_size=64 --out_dir=out/snr

SGD-SaI's g-SNR, ||g|| / std(g), looks inside one tensor's averaged gradient g. The per-example
SNR (as in arXiv 2510.00236) looks across examples instead. For per-example gradients g_1..g_B of
a block (torch.func: vmap over grad) and their mean g (the batch gradient the optimizer sees):

    signal = ||g||^2                                     (squared norm of the mean gradient)
    noise  = (1/B) * (1/B) sum_i ||g_i - g||^2           (mean squared deviation, divided by B:
                                                          the variance of the batch mean)
    SNR    = signal / noise

SNR > 1 means the batch gradient's direction is mostly signal. Printed too: the noise scale of
the whole model, B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), the batch size below
which gradient noise dominates a step. The figure asks whether SaI's
within-tensor statistic tracks this across-example one (Spearman rank correlation in the title).
Writes snr.csv, snr.md and snr.png to out_dir.
"""
import csv
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import optim
import per_example
from cli import ConfigError, check_positive, option, parse_args
from data.files import CACHE_DIR
from plots.studies import snr_figure


@dataclass
class SNRConfig:
    trainer: str = option("nanogpt", "nanogpt (baby GPT, tiny shakespeare) or vit")
    batch_size: int = option(32, "examples whose gradients are compared")
    seed: int = option(1337, "seed of the weights and the batch")
    data_path: str = option("", "as the trainer's --data_path")
    data_dir: str = option(CACHE_DIR, "as the trainer's --data_dir")
    out_dir: str = option("out/snr", "where the table and figure go")


def gradient_snr(grads):
    """{name: (signal, noise, snr)} for per-example gradients (B, *shape), as defined above."""
    out = {}
    for name, g in grads.items():
        b = g.shape[0]
        mean = g.mean(dim=0)
        signal = mean.pow(2).sum().item()
        noise = (g - mean).pow(2).sum().item() / b / b
        out[name] = (signal, noise, signal / noise if noise > 0 else math.inf)
    return out


def sai_scales(batch_grads, eps=1e-8):
    """{rule: {name: scale}}: what SGDSaI freezes at its first step, for every scale rule."""
    scales = {}
    for rule in optim.SAI_RULES:
        raw = {name: optim.sai_scale(g, rule, eps).item() for name, g in batch_grads.items()}
        if rule == "gsnr_max":
            top = max(raw.values())
            raw = {name: s / top for name, s in raw.items()}
        scales[rule] = raw
    return scales


def model_and_batch(cfg):
    """The trainer's default model at initialisation, a batch, and its per-example loss."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.trainer == "nanogpt":
        import nanogpt_sai
        from data.text import load_text, sample_batch
        data = load_text("shakespeare_char", data_dir=cfg.data_dir, text_path=cfg.data_path)
        mcfg = nanogpt_sai.Config()
        model = nanogpt_sai.GPT(mcfg, data.vocab_size)
        tokens = torch.from_numpy(data.train.astype("int64"))
        x, y = sample_batch(tokens, mcfg.block_size, cfg.batch_size, gen)

        def loss_fn(out, y):
            return F.cross_entropy(out[0].flatten(0, 1), y.flatten())
    elif cfg.trainer == "vit":
        import vit_sai
        from data.images import load_images
        data = load_images("fashion_mnist", data_dir=cfg.data_dir, data_path=cfg.data_path)
        model = vit_sai.ViT(vit_sai.Config(), data.train_x.shape[-1], data.train_x.shape[1],
                            len(data.classes))
        ix = torch.randperm(len(data.train_y), generator=gen)[:cfg.batch_size]
        pixels = data.train_x.float() / 255
        x = (pixels[ix] - pixels.mean()) / pixels.std()
        y = data.train_y[ix]
        loss_fn = F.cross_entropy
    else:
        raise ConfigError(f"--trainer must be nanogpt or vit, got {cfg.trainer!r}")
    return model.eval(), x, y, loss_fn


def block_table(model, x, y, loss_fn):
    """One row per parameter block: kind, numel, per-example SNR and the SaI scale per rule."""
    grads, _ = per_example.example_gradients(model, loss_fn, x, y)
    batch_grads = {name: g.mean(dim=0) for name, g in grads.items()}
    snr = gradient_snr(grads)
    scales = sai_scales(batch_grads)
    kinds = optim.param_kinds(model)
    rows = []
    for name, p in model.named_parameters():
        signal, noise, ratio = snr[name]
        rows.append(dict(name=name, kind=kinds.get(p, "other"), numel=p.numel(),
                         signal=signal, noise=noise, example_snr=ratio,
                         **{f"sai_{rule}": scales[rule][name] for rule in optim.SAI_RULES}))
    return rows


def main(argv):
    try:
        cfg, _ = parse_args(SNRConfig(), argv, __doc__.strip().splitlines()[0])
        check_positive(cfg, "batch_size")
        model, x, y, loss_fn = model_and_batch(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = block_table(model, x, y, loss_fn)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "snr.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| block | kind | numel | per-example SNR | g-SNR (gsnr) | sqrt(numel) | gsnr_max |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['kind']} | {r['numel']:,} | {r['example_snr']:.3g} | "
              f"{r['sai_gsnr']:.1f} | {r['sai_sqrt_numel']:.1f} | {r['sai_gsnr_max']:.3f} |"
              for r in rows]
    with open(os.path.join(cfg.out_dir, "snr.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    statistics, _ = per_example.batch_statistics(model, loss_fn, x, y, write_grad=False)
    print(f"noise scale of the whole model (B_simple, per_example.noise_scale): "
          f"{per_example.noise_scale(statistics):.3g} examples")
    print(f"wrote {snr_figure(rows, os.path.join(cfg.out_dir, 'snr.png'), cfg.batch_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
