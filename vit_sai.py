"""
A small Vision Transformer trained from scratch with any optimizer in optim.py.

    python vit_sai.py                                      # Fashion-MNIST, SGD-SaI
    python vit_sai.py --optimizer=sgd_sai,adamw,adam_mini   # compare (or --optimizer=all)
    python vit_sai.py --dataset=cifar10                    # with crop + flip augmentation
    python vit_sai.py --resume=out/<run dir>               # continue an interrupted run
    python vit_sai.py --help                               # every option

Same conventions as nanogpt_sai.py (config, CLI, logs, checkpoints, plots); reads top to bottom:
config -> data -> model -> optimizer -> loop over epochs. Offline without the data, it trains on
digits rendered from matplotlib's fonts and says so.
"""
import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

import optim
import parallel
import per_example
from cli import (ConfigError, RunOptions, check_positive, data_error, option,
                 optimizer_names, pick_device, pick_dtype, read_config, warmup_steps)
from compare import compare
from data.images import DATASETS, hold_out, load_images, random_crop_flip
from train_helpers import (EXIT_STATUS, MetricsLog, Progress, StopOnCtrlC, check_out_dir,
                           data_name, gradient_diagnostics, load_checkpoint,
                           loss_far_above_chance, lr_at, maybe_compile, memory_fields,
                           open_run_dir, report_end, save_checkpoint, write_run_info)


@dataclass
class Config(RunOptions):
    """The options both trainers share (--optimizer, --lr, --beta1, ..., --device, --dtype,
    --resume) are cli.RunOptions; two of their defaults are the ViT's own."""
    # data
    dataset: str = option("fashion_mnist", "fashion_mnist, cifar10 or digits (rendered)")
    data_path: str = option("", "folder with the data set's files (default: cache, "
                                "/usr/share/datasets, download, then rendered digits)")
    # model
    patch_size: int = option(4, "patch side in pixels (must divide the image side)")
    dim: int = option(64, "width")
    depth: int = option(4, "transformer blocks")
    heads: int = option(4, "attention heads (must divide dim)")
    mlp_ratio: int = option(2, "MLP hidden width = mlp_ratio * dim")
    pool: str = option("cls", "cls (class token) or mean (average of patch tokens)")
    dropout: float = option(0.0, "dropout probability")
    # optimizer: the ViT's defaults of shared options
    min_lr_ratio: float = option(0.01, "the decay ends at lr * min_lr_ratio")
    weight_decay: float = option(0.05, "decoupled weight decay of matrices and embeddings")
    # training
    optimizer: str = option("sgd_sai", f"{', '.join(optim.OPTIMIZERS)}; per-example: "
                                       f"{', '.join(optim.PER_EXAMPLE_OPTIMIZERS)}; a comma-"
                                       "separated list of them, or all (the first seven: compare)")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    batch_size: int = option(128, "images per step")
    epochs: int = option(8, "passes over the training set")
    max_iters: int = option(0, "stop after this many steps; 0 = all epochs")
    val_images: int = option(5000, "training images held out as the validation split (the same "
                                   "ones in every run), evaluated each epoch; the test set is "
                                   "read once, after the last step")
    log_interval: int = option(50, "console and metrics line every this many steps")
    seed: int = option(1337, "seed of weights, shuffling, augmentation and dropout")
    diagnostics: bool = option(False, "at each evaluation, per-block gradient statistics from "
                                      "one fixed batch's per-example gradients (g-SNR, "
                                      "per-example SNR, noise scale): diagnostics.png")


# Peak learning rates: the best of the Fashion-MNIST sweep in docs/results.md (3-epoch runs,
# 4-6 values)
DEFAULT_LR = {"adamw": 4e-3, "sgd_sai": 4e-2, "adam_mini": 4e-3, "apollo": 8e-3,
              "apollo_mini": 8e-3, "muon": 4e-3, "adafactor": 4e-2,
              "sign_sgd": 1.6e-2, "adam_pe": 3.2e-2}   # lr only (docs/per-example.md)
USAGE = __doc__.strip().splitlines()[0] + "\n\n" + "\n".join(__doc__.strip().splitlines()[2:7])


def resolve_config(argv):
    """Command line -> checked Config with the device, dtype and default lr filled in. A resumed
    run's saved config is final; in compare mode each run resolves its own."""
    cfg, _ = read_config(Config, argv, USAGE)
    if cfg.resume or len(optimizer_names(cfg.optimizer)) > 1:
        return cfg
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"--dataset must be {', '.join(DATASETS[:-1])} or {DATASETS[-1]}, "
                          f"got {cfg.dataset!r}")
    check_positive(cfg, "patch_size", "dim", "depth", "heads", "mlp_ratio", "epochs",
                   "val_images")
    if cfg.max_iters < 0:
        raise ConfigError(f"--max_iters must be >= 0, got {cfg.max_iters}")
    if cfg.dim % cfg.heads:
        raise ConfigError(f"--dim={cfg.dim} must be divisible by --heads={cfg.heads}")
    if cfg.pool not in ("cls", "mean"):
        raise ConfigError(f"--pool must be cls or mean, got {cfg.pool!r}")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.label_smoothing < 1:
        raise ConfigError("--dropout and --label_smoothing must be in [0, 1)")
    device = pick_device(cfg.device)
    if cfg.optimizer in optim.PER_EXAMPLE_OPTIMIZERS and \
            pick_dtype(cfg.dtype, device) == "float16":
        raise ConfigError(f"--optimizer={cfg.optimizer} steps from per-example statistics, "
                          "which float16's loss scaling would distort: use --dtype=bfloat16")
    return dataclasses.replace(cfg, device=device, dtype=pick_dtype(cfg.dtype, device),
                               lr=cfg.lr or DEFAULT_LR[cfg.optimizer])


# ---------------------------------------------------------------------------------------------
# model: ViT (Dosovitskiy et al. 2021) in the style of lucidrains/vit-pytorch, pre-norm blocks

class Attention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)  # fused [Q; K; V]
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b n (three h d) -> three b h n d",
                            three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class ViT(nn.Module):
    def __init__(self, cfg, image_size, channels, num_classes):
        super().__init__()
        p = cfg.patch_size
        num_patches, patch_dim = (image_size // p) ** 2, channels * p * p
        self.n_head, self.pool = cfg.heads, cfg.pool
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p),
            nn.LayerNorm(patch_dim), nn.Linear(patch_dim, cfg.dim), nn.LayerNorm(cfg.dim))
        # learned position embeddings (position 0: the class token's) and the class token, as
        # Embedding tables that each image looks up (per_example's layer rules cover them)
        self.pos_embedding = nn.Embedding(num_patches + 1, cfg.dim,
                                          _weight=0.02 * torch.randn(num_patches + 1, cfg.dim))
        self.cls_token = nn.Embedding(1, cfg.dim, _weight=0.02 * torch.randn(1, cfg.dim))
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(nn.ModuleList([
            Attention(cfg.dim, cfg.heads, cfg.dropout),
            FeedForward(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.dropout)])
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.mlp_head = nn.Linear(cfg.dim, num_classes)

    def forward(self, img):                                   # (B, C, H, W), normalised
        x = self.to_patch_embedding(img)                      # (B, N, dim)
        b, n = x.shape[:2]
        cls = self.cls_token(torch.zeros(b, 1, dtype=torch.long, device=x.device))  # (B, 1, dim)
        pos = torch.arange(n + 1, device=x.device).expand(b, n + 1)
        x = self.dropout(torch.cat([cls, x], dim=1) + self.pos_embedding(pos))
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.mlp_head(self.norm(x))                    # (B, classes)

    def param_kinds(self):
        """What each parameter is, for optim.py (Adam-mini's blocks, the diagnostics): Q/K of
        the fused to_qkv per head, V/proj/MLP/patch embedding per neuron, head per class, class
        token and position embedding one block each."""
        # the patch embedding is a Linear that embeds: per neuron for Adam-mini, AdamW in APOLLO
        kinds = {self.pos_embedding.weight: "position", self.cls_token.weight: "position",
                 self.mlp_head.weight: "head", self.to_patch_embedding[2].weight: "embedding"}
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                kinds[module.weight] = "norm"
        for attn, ff in self.layers:
            kinds[attn.to_qkv.weight] = "qkv"
            kinds[attn.to_out.weight] = "proj"
            kinds[ff.net[1].weight] = kinds[ff.net[4].weight] = "mlp"
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                kinds[p] = "bias"
        return kinds


# ---------------------------------------------------------------------------------------------
# training: data and batches, evaluation, the run directory, then the loop

def load_data(cfg):
    """cfg.dataset's images and labels, cfg.val_images of the training images held out as the
    validation split; a bad --data_path or --val_images is a ConfigError."""
    try:
        # seed 0, not cfg.seed: the rendered digits' test fonts stay the same across seeds
        data = load_images(cfg.dataset, data_dir=cfg.data_dir, data_path=cfg.data_path, seed=0)
    except (OSError, ValueError) as err:   # a --data_path that is missing or malformed
        raise data_error(err, cfg.data_dir) from None
    if cfg.val_images >= len(data.train_y):
        raise ConfigError(f"--val_images={cfg.val_images} would leave no training image of the "
                          f"{len(data.train_y):,} of {data.source}; hold out fewer")
    return hold_out(data, cfg.val_images)


def input_normalizer(cfg, data, device):
    """uint8 images -> the model's float input on `device`, each channel normalised by the mean
    and std of the training pixels; a --patch_size that does not divide the images is a
    ConfigError."""
    if data.train_x.shape[-1] % cfg.patch_size:
        raise ConfigError(f"--patch_size={cfg.patch_size} must divide the image side "
                          f"{data.train_x.shape[-1]} of {data.source}")
    pixels = data.train_x.float().div_(255).transpose(0, 1).flatten(1)
    mean, std = (s.view(1, -1, 1, 1).to(device) for s in (pixels.mean(1), pixels.std(1)))

    def to_input(x_uint8):
        return (x_uint8.to(device).float() / 255 - mean) / std
    return to_input


def get_batch(cfg, data, order, step, shuffle_gen, to_input, device, world):
    """This rank's share (inputs, labels) of batch `step` of the current epoch's `order`, and
    the batch's size (every rank draws it whole); cifar10 gets crop + flip."""
    steps_per_epoch = math.ceil(len(data.train_y) / cfg.batch_size)
    idx = order[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
    x = data.train_x[idx]
    if data.augment:
        x = random_crop_flip(x, shuffle_gen)
    x, y = to_input(x), data.train_y[idx].to(device)
    return x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank], len(y)


def trial_step(compiled, cfg, data, ctx, to_input, device):
    """One throw-away forward/backward through the compiled model (maybe_compile undoes it)."""
    with ctx:
        F.cross_entropy(compiled(to_input(data.train_x[:cfg.batch_size])),
                        data.train_y[:cfg.batch_size].to(device)).backward()


def diagnostics_batch(cfg, data, to_input, device):
    """--diagnostics' fixed batch: batch_size training images drawn by the seed."""
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(
        cfg.seed + 2))[:cfg.batch_size]
    return to_input(data.train_x[idx]), data.train_y[idx].to(device)


@torch.no_grad()
def evaluate(model, images, labels, n_classes, ctx, to_input, device, world):
    """Loss, accuracy and the confusion matrix (rows: true class, columns: predicted) on a
    split (the validation images each epoch, the test set once at the end), in chunks of 1000
    images that the ranks share."""
    model.eval()
    loss_sum, confusion = 0.0, torch.zeros(n_classes * n_classes, dtype=torch.long)
    starts = range(0, len(labels), 1000)
    # every rank runs as many forwards (each gathers FSDP2's slices), the last discarded
    for j in range(-(-len(starts) // world.size) * world.size):
        if j % world.size != world.rank:
            continue
        i = starts[min(j, len(starts) - 1)]
        y = labels[i:i + 1000].to(device)
        with ctx:
            logits = model(to_input(images[i:i + 1000])).float()
        if j >= len(starts):
            continue
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pairs = (y * n_classes + logits.argmax(1)).cpu()
        confusion += torch.bincount(pairs, minlength=n_classes * n_classes)
    model.train()
    loss_sum = parallel.sum_over_ranks(torch.tensor(loss_sum, dtype=torch.float64), world).item()
    confusion = parallel.sum_over_ranks(confusion, world).view(n_classes, n_classes)
    return dict(loss=loss_sum / len(labels), acc=confusion.trace().item() / len(labels),
                confusion=confusion.tolist())


def open_run(cfg, world, device, data, model, raw_model, opt, scaler, shuffle_gen, order,
             warmup_iters):
    """The run directory, fresh or resumed, as nanogpt_sai.py's open_run (the checkpoint also
    restores the epoch's order and shuffle_gen). Returns (run_dir, metrics log, step, the step
    already evaluated (None: none), training seconds, best val accuracy, order) to go on
    from."""
    run_dir = open_run_dir(cfg, f"{data_name(cfg.dataset, data.source)}-{cfg.optimizer}") \
        if world.main or cfg.resume else None   # rank 0 alone writes files and prints
    it, train_s, best_acc, resumed_at = 0, 0.0, 0.0, None
    data_facts = dict(data_source=data.source, n_train=len(data.train_y),
                      n_val=len(data.val_y), n_test=len(data.test_y))
    if cfg.resume:
        ckpt = load_checkpoint(run_dir, model, opt, scaler, world, **data_facts)
        shuffle_gen.set_state(ckpt["shuffle_gen"])
        order = ckpt["order"]
        it, train_s, best_acc = ckpt["step"], ckpt["train_s"], ckpt["best_acc"]
        resumed_at = it if ckpt.get("evaluated", True) else None   # as nanogpt_sai.py's
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if world.main else None,
                     resume_step=it if cfg.resume else None)
    if world.main:
        n_params = write_run_info(run_dir, cfg, raw_model, world, warmup_iters=warmup_iters,
                                  classes=data.classes, **data_facts)
        print(f"{n_params / 1e6:.2f}M parameters | {data.source} {len(data.train_y)} train "
              f"images | {cfg.optimizer} lr {cfg.lr:g} wd {cfg.weight_decay:g} | {device} "
              f"{cfg.dtype} | " + (f"{cfg.parallel} x {world.size} | " if world.size > 1 else "")
              + f"run dir {run_dir}")
    return run_dir, log, it, resumed_at, train_s, best_acc, order


def train(cfg):
    """One run (of this rank, under torchrun); returns its exit status (0 finished, 130 stopped
    by Ctrl-C, 3 diverged)."""
    world, device = parallel.start(cfg.parallel, cfg.device)   # one process: nothing to start
    if world.main:
        check_out_dir(cfg)   # before the data is loaded: a bad --out_dir is found at once
    with parallel.main_first(world):   # rank 0 fills the data cache, the others read it
        data = load_data(cfg)
    to_input = input_normalizer(cfg, data, device)

    # model, optimizer, and mixed precision as in nanogpt_sai.py (`model` what trains, under
    # DDP or FSDP2 with each attention and MLP sublayer sharded on its own; raw_model the ViT)
    torch.manual_seed(cfg.seed)  # same initial weights for every optimizer
    raw_model = ViT(cfg, data.train_x.shape[-1], data.train_x.shape[1],
                    len(data.classes)).to(device)
    sublayers = [sublayer for layer in raw_model.layers for sublayer in layer]   # attention, MLP
    model = parallel.wrap(raw_model, world, sublayers, optim.shard_dims(cfg.optimizer, raw_model))
    opt = optim.build_optimizer(cfg.optimizer, raw_model, log=print if world.main else None,
                                **optim.trainer_hparams(cfg.optimizer, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.dtype == "float16")
    ctx = nullcontext() if cfg.dtype == "float32" else torch.autocast(
        device_type="cuda", dtype=getattr(torch, cfg.dtype))
    n_train = len(data.train_y)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.max_iters or cfg.epochs * steps_per_epoch
    warmup_iters = warmup_steps(cfg.warmup_iters, total_steps)   # known once the data is
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)      # epoch order and augmentation
    order = torch.randperm(n_train, generator=shuffle_gen)
    run_dir, log, it, resumed_at, train_s, best_acc, order = open_run(
        cfg, world, device, data, model, raw_model, opt, scaler, shuffle_gen, order, warmup_iters)
    model = maybe_compile(model, cfg.compile, lambda compiled: trial_step(
        compiled, cfg, data, ctx, to_input, device))

    per_example_step = optim.takes_per_example(opt)

    def image_loss(logits, labels):   # the batch's mean loss (per-example statistics, diagnostics)
        return F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    over_ranks = (lambda t: parallel.sum_over_ranks(t, world)) if world.size > 1 else None

    status = "finished"
    progress = Progress(world, device, total_steps, it, train_s)
    # Nothing is read back from the GPU between log lines (see nanogpt_sai.py): losses are summed
    # on the device, a non-finite one is remembered there, and the clock syncs only when read.
    all_finite = torch.ones((), dtype=torch.bool, device=device)
    epoch_loss, epoch_steps = torch.zeros((), device=device), 0
    t_start = time.time()
    with StopOnCtrlC(world) as stop:   # under torchrun: agreed by all ranks (below)
        while True:
            lr = lr_at(it, cfg.lr, warmup_iters, total_steps, cfg.min_lr_ratio, cfg.schedule,
                       cfg.cooldown)
            for group in opt.param_groups:
                group["lr"] = lr

            # evaluate on the validation images and checkpoint at each epoch's end (not again
            # the step a resumed run's checkpoint evaluated)
            if (it % steps_per_epoch == 0 or it == total_steps) and it != resumed_at:
                train_s = progress.clock.pause()
                val = evaluate(model, data.val_x, data.val_y, len(data.classes), ctx, to_input,
                               device, world)
                result = dict(val_loss=val["loss"], val_acc=val["acc"],
                              confusion=val["confusion"])
                if cfg.diagnostics:   # the same images each time, in eval mode
                    x, y = diagnostics_batch(cfg, data, to_input, device)
                    raw_model.eval()
                    result.update(gradient_diagnostics(raw_model, opt, image_loss, x, y))
                    raw_model.train()
                if parallel.any_rank(not all_finite.item(), world) or not math.isfinite(
                        result["val_loss"]):
                    status = "diverged"
                    break
                best_acc = max(best_acc, result["val_acc"])
                epoch_mean = parallel.sum_over_ranks(epoch_loss, world).item() / max(epoch_steps, 1)
                log.write(event="eval", step=it, epoch=it / steps_per_epoch,
                          train_loss=epoch_mean if epoch_steps else None, **result,
                          best_val_acc=best_acc, lr=lr, samples=it * cfg.batch_size,
                          train_s=train_s, wall_s=time.time() - t_start,
                          **memory_fields(raw_model, opt, device, world))
                progress.say(f"epoch {it / steps_per_epoch:.2f}: val loss "
                             f"{result['val_loss']:.4f}, val accuracy "
                             f"{100 * result['val_acc']:.2f}%")
                epoch_loss, epoch_steps = torch.zeros((), device=device), 0
                save_checkpoint(run_dir, model, opt, scaler, cfg, world, step=it, order=order,
                                shuffle_gen=shuffle_gen.get_state(), train_s=train_s,
                                best_acc=best_acc, evaluated=True)
            if it == total_steps:
                break

            # clear the gradients, forward, backward (scaled under fp16), then the optimizer
            # step: unscale (fp16 only), clip the global norm, step. Under torchrun each rank's
            # loss is its part of the batch's mean; backward averages over ranks: * world.size.
            # A per-example optimizer steps from each image's own gradient instead, summarised
            # over the whole batch (every rank's share), unclipped (as in nanogpt_sai.py).
            progress.clock.start()
            opt.zero_grad(set_to_none=True)
            x, y, n_batch = get_batch(cfg, data, order, it, shuffle_gen, to_input, device, world)
            if per_example_step:
                with ctx:
                    part, loss = per_example.batch_statistics(raw_model, image_loss, x, y,
                                                              write_grad=False)
                loss = loss * len(y) / n_batch
                all_finite &= torch.isfinite(loss)
                opt.step(per_example.merge([part], over_ranks))
            else:
                with ctx:
                    loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing,
                                           reduction="sum") / n_batch
                all_finite &= torch.isfinite(loss.detach())
                scaler.scale(loss * world.size).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
            it += 1
            if it % steps_per_epoch == 0:  # drawn before the epoch-end checkpoint, saved with it
                order = torch.randperm(n_train, generator=shuffle_gen)
            progress.bar.update(1)
            epoch_loss, epoch_steps = epoch_loss + loss.detach(), epoch_steps + 1

            # log: the metrics line and the console line (memory is probed here only)
            if it % cfg.log_interval == 0 or it == total_steps:
                train_s, ms = progress.lap(it)
                step_loss = parallel.sum_over_ranks(loss.detach(), world).item()
                if parallel.any_rank(not all_finite.item(), world):
                    status = "diverged"
                    break
                progress.warn_once(loss_far_above_chance(step_loss, len(data.classes)))
                mem = memory_fields(raw_model, opt, device, world)
                log.write(event="train", step=it, loss=step_loss, lr=lr, ms=ms,
                          epoch=it / steps_per_epoch, samples=it * cfg.batch_size,
                          train_s=train_s, wall_s=time.time() - t_start, **mem)
                progress.say(f"iter {it} | loss {step_loss:.4f} | lr {lr:.1e} | {ms:.1f} ms | "
                             f"{cfg.batch_size * 1000 / ms:,.0f} img/s | state "
                             f"{mem['state_bytes'] / (2 * mem['param_bytes']):.2f}x AdamW")
            if parallel.any_rank(stop.requested, world):   # all ranks stop at the same step
                # checkpoint a model whose losses were all finite, only
                status = "diverged" if parallel.any_rank(not all_finite.item(), world) \
                    else "stopped"
                if status == "stopped":
                    save_checkpoint(run_dir, model, opt, scaler, cfg, world, step=it, order=order,
                                    shuffle_gen=shuffle_gen.get_state(),
                                    train_s=progress.clock.pause(), best_acc=best_acc,
                                    evaluated=False)
                break
    progress.bar.close()
    if status == "finished":   # the test set, once: never read by a selection (sweeps use val)
        test = evaluate(model, data.test_x, data.test_y, len(data.classes), ctx, to_input,
                        device, world)
        log.write(event="test", step=it, test_loss=test["loss"], test_acc=test["acc"],
                  confusion=test["confusion"])
    log.write(event="end", step=it, status=status, train_s=progress.clock.pause())
    log.close()
    code = report_end(status, it, run_dir, "vit_sai.py") if world.main else EXIT_STATUS[status]
    return parallel.finish(code, world)


def main(argv):
    """Exit statuses as nanogpt_sai.py's (0 finished, 130 stopped, 3 diverged, 2 bad command
    line, 1 a compared run that did not finish)."""
    try:
        cfg = resolve_config(argv)
        cfg = dataclasses.replace(cfg, parallel=parallel.check_mode(cfg, "vit_sai.py"))
        names = optimizer_names(cfg.optimizer)   # several: compare, each in its own process
        if len(names) == 1:
            return train(cfg)
        # a new folder is named after the data the runs will have (an offline fallback says so)
        name = "" if cfg.out_dir else f"compare-{data_name(cfg.dataset, load_data(cfg).source)}"
        return compare(__file__, resolve_config, names, argv, cfg.out_dir, name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
