"""
A nanoGPT-style GPT trained with any optimizer in optim.py (SGD-SaI by default).

    python nanogpt_sai.py                                    # baby GPT, tiny shakespeare, ~3 min
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm import tqdm

import train_common as tc
from data.text import load_text


@dataclass
class Config:
    # data
    dataset: str = tc.option("shakespeare_char", "shakespeare_char (characters) or shakespeare "
                                                 "(GPT-2 BPE)")
    data_path: str = tc.option("", "tiny shakespeare input.txt to use (default: cache, then "
                                   "download, then an offline corpus)")
    data_dir: str = tc.option(tc.DATA_CACHE, "where raw and prepared data are cached")
    # model (defaults: nanoGPT's CPU run; the gpu preset is in PRESETS)
    n_layer: int = tc.option(4, "transformer blocks")
    n_head: int = tc.option(4, "attention heads (must divide n_embd)")
    n_embd: int = tc.option(128, "width")
    block_size: int = tc.option(64, "context length in tokens")
    dropout: float = tc.option(0.0, "dropout probability")
    bias: bool = tc.option(False, "biases in Linear and LayerNorm layers")
    # optimizer
    optimizer: str = tc.option("sgd_sai", "sgd_sai, adamw, adam_mini, apollo, apollo_mini, a "
                                          "comma-separated list of them, or all (compare)")
    lr: float = tc.option(0.0, "peak learning rate; 0 = the optimizer's default for the preset")
    min_lr_ratio: float = tc.option(0.1, "cosine decays the lr to lr * min_lr_ratio")
    weight_decay: float = tc.option(0.1, "decoupled weight decay of matrices and embeddings")
    beta1: float = tc.option(0.9, "AdamW/Adam-mini beta1; SGD-SaI momentum")
    beta2: float = tc.option(0.99, "AdamW/Adam-mini beta2")
    sai_rule: str = tc.option("gsnr", "SGD-SaI scale rule: gsnr, gsnr_max, sqrt_numel, none")
    grad_clip: float = tc.option(1.0, "clip the global gradient norm to this; 0 = off")
    warmup_iters: int = tc.option(100, "linear warmup steps")
    lr_decay_iters: int = tc.option(0, "cosine length in steps; 0 = max_iters")
    # training
    batch_size: int = tc.option(12, "sequences per micro-batch")
    grad_accum: int = tc.option(1, "micro-batches per optimizer step")
    max_iters: int = tc.option(2000, "optimizer steps")
    eval_interval: int = tc.option(250, "evaluate and checkpoint every this many steps")
    eval_iters: int = tc.option(20, "batches per split in each evaluation")
    log_interval: int = tc.option(50, "console and metrics line every this many steps")
    seed: int = tc.option(1337, "seed of weights, batches and dropout")
    sample_tokens: int = tc.option(300, "tokens sampled at the end; 0 = none")
    # system
    preset: str = tc.option("auto", "cpu (nanoGPT's CPU run), gpu (6x384, block 256, batch 64) "
                                    "or auto (gpu on CUDA)")
    device: str = tc.option("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = tc.option("auto", "autocast dtype: auto (bf16, else fp16 on CUDA; fp32 "
                                   "elsewhere), float32, bfloat16, float16")
    compile: bool = tc.option(False, "torch.compile the model (falls back if it fails)")
    out_dir: str = tc.option("", "run directory; default out/<time>-<dataset>-<optimizer>")
    resume: str = tc.option("", "run directory to resume from its checkpoint")


PRESETS = {
    "cpu": {},
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                max_iters=5000, eval_iters=200, log_interval=100),
}
# Peak learning rates: cpu, the best of the README's sweep at the cpu preset (5-6 values each);
# gpu, not tuned: the cpu values times nanoGPT's own AdamW ratio between the two (1e-3 / 4e-3).
DEFAULT_LR = {
    "cpu": {"adamw": 4e-3, "sgd_sai": 2e-2, "adam_mini": 8e-3, "apollo": 3.2e-2,
            "apollo_mini": 8e-3},
    "gpu": {"adamw": 1e-3, "sgd_sai": 5e-3, "adam_mini": 2e-3, "apollo": 8e-3,
            "apollo_mini": 2e-3},
}
USAGE = __doc__.strip().splitlines()[0] + "\n\n" + "\n".join(__doc__.strip().splitlines()[2:7])


def resolve_config(argv):
    """Command line -> checked Config (preset and default lr applied) and the device."""
    cfg, given = tc.parse_args(Config(), argv, USAGE)
    if cfg.resume:
        return tc.resumed_config(Config, cfg, given)
    tc.check_common(cfg)
    if len(tc.optimizer_names(cfg.optimizer)) > 1:
        return cfg
    device = tc.pick_device(cfg.device)
    preset = cfg.preset if cfg.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    if preset not in PRESETS:
        raise tc.ConfigError(f"--preset must be auto, cpu or gpu, got {cfg.preset!r}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in PRESETS[preset].items() if k not in given})
    if cfg.dataset not in ("shakespeare_char", "shakespeare"):
        raise tc.ConfigError("--dataset must be shakespeare_char or shakespeare, got "
                             f"{cfg.dataset!r}")
    tc.check_positive(cfg, "n_layer", "n_head", "n_embd", "block_size", "max_iters",
                      "eval_interval", "eval_iters", "grad_accum")
    if cfg.lr_decay_iters < 0:
        raise tc.ConfigError(f"--lr_decay_iters must be >= 0, got {cfg.lr_decay_iters}")
    if cfg.n_embd % cfg.n_head:
        raise tc.ConfigError(f"--n_embd={cfg.n_embd} must be divisible by --n_head={cfg.n_head}")
    if not 0 <= cfg.dropout < 1:
        raise tc.ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    return dataclasses.replace(cfg, preset=preset, device=device,
                               dtype=tc.pick_dtype(cfg.dtype, device),
                               lr=cfg.lr or DEFAULT_LR[preset][cfg.optimizer],
                               lr_decay_iters=cfg.lr_decay_iters or cfg.max_iters)


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
        t = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, device=idx.device))
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
    def generate(self, idx, new_tokens, temperature=0.8, top_k=200):
        for _ in range(new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            logits = logits[:, -1, :] / temperature
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
            logits[logits < kth] = -float("inf")
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx


# ---------------------------------------------------------------------------------------------
# training

def train(cfg):
    """One run; returns "finished", "stopped" (Ctrl-C) or "diverged"."""
    device = cfg.device
    try:
        data = load_text(cfg.dataset, data_dir=cfg.data_dir, text_path=cfg.data_path)
    except (OSError, ValueError) as err:   # a --data_path that is missing or unreadable
        raise tc.ConfigError(f"--data_path: {err}") from None
    splits = {"train": torch.from_numpy(data.train.astype("int64")),
              "val": torch.from_numpy(data.val.astype("int64"))}
    shortest = min(len(s) for s in splits.values())
    if cfg.block_size >= shortest:
        raise tc.ConfigError(f"--block_size={cfg.block_size} needs more tokens than the "
                             f"{shortest} of the smallest split; use --block_size < {shortest}")
    offsets = torch.arange(cfg.block_size + 1)

    def get_batch(split, generator):
        d = splits[split]
        ix = torch.randint(len(d) - cfg.block_size, (cfg.batch_size,), generator=generator)
        xy = d[ix[:, None] + offsets]                    # (B, T + 1)
        x, y = xy[:, :-1], xy[:, 1:]
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device,
                                                                                  non_blocking=True)
        return x.to(device), y.to(device)

    torch.manual_seed(cfg.seed)  # same initial weights for every optimizer
    model = GPT(cfg, data.vocab_size).to(device)
    opt, scaler = tc.make_optimizer(cfg, model)
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # training batch order

    # run directory: a fresh one, or the one we resume (its checkpoint restores everything)
    run_dir = tc.open_run_dir(cfg, f"{cfg.dataset}-{cfg.optimizer}")
    it, train_s, best_val = 0, 0.0, float("inf")
    if cfg.resume:
        ckpt = tc.load_run(run_dir, model, opt, scaler)
        batch_gen.set_state(ckpt["batch_gen"])
        it, train_s, best_val = ckpt["step"], ckpt["train_s"], ckpt["best_val"]
    n_params = tc.write_run_info(run_dir, cfg, model, data_source=data.source,
                                 vocab_size=data.vocab_size)
    print(f"{n_params / 1e6:.2f}M parameters | {cfg.optimizer} lr {cfg.lr:g} | {device} "
          f"{cfg.dtype} | run dir {run_dir}")
    log = tc.MetricsLog(os.path.join(run_dir, "metrics.jsonl"),
                        resume_step=it if cfg.resume else None)
    ctx = tc.autocast(device, cfg.dtype)

    def forward_backward(m):
        x, y = get_batch("train", batch_gen)
        with ctx:
            _, loss = m(x, y)
        scaler.scale(loss / cfg.grad_accum).backward()
        return loss.detach()

    def trial(m):  # one throw-away step through the compiled model, on a copied batch stream
        x, y = get_batch("train", torch.Generator().manual_seed(0))
        with ctx:
            m(x, y)[1].backward()

    fast_model = tc.maybe_compile(model, cfg.compile, trial)

    @torch.no_grad()
    def evaluate():
        fast_model.eval()
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same eval batches every time
        out = {}
        for split in ("train", "val"):
            losses = []
            for _ in range(cfg.eval_iters):
                with ctx:
                    losses.append(fast_model(*get_batch(split, gen))[1].item())
            out[split] = sum(losses) / len(losses)
        fast_model.train()
        return out

    def save():
        tc.save_run(run_dir, model, opt, scaler, cfg, batch_gen=batch_gen.get_state(), step=it,
                    train_s=train_s, best_val=best_val)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    timer, status, resumed_at = tc.Timer(device, train_s), "finished", it
    bar = tqdm(total=cfg.max_iters, initial=it, disable=None, dynamic_ncols=True, leave=False)
    interval_s, interval_steps = 0.0, 0
    t_start = time.time()
    with tc.StopOnCtrlC() as stop:
        while True:
            lr = tc.lr_at(it, cfg.lr, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr

            # evaluate and checkpoint (the step we resumed at was evaluated before the stop)
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (
                    cfg.resume and it == resumed_at):
                losses = evaluate()
                if not all(math.isfinite(v) for v in losses.values()):
                    status = "diverged"
                    break
                best_val = min(best_val, losses["val"])
                log.write(event="eval", step=it, train_loss=losses["train"],
                          val_loss=losses["val"], best_val_loss=best_val, lr=lr,
                          tokens=it * tokens_per_step, train_s=timer.seconds,
                          wall_s=time.time() - t_start, **tc.memory_fields(model, opt, device))
                bar.write(f"step {it}: train loss {losses['train']:.4f}, val loss "
                          f"{losses['val']:.4f}")
                save()
            if it == cfg.max_iters:
                break

            # forward/backward over grad_accum micro-batches, clip, step
            with timer:
                loss = sum(forward_backward(fast_model) for _ in range(cfg.grad_accum))
                loss = loss.item() / cfg.grad_accum
                if not math.isfinite(loss):
                    status = "diverged"
                    break
                tc.clip_and_step(model, opt, scaler, cfg.grad_clip)
            it += 1
            train_s = timer.seconds
            bar.update(1)
            interval_s, interval_steps = interval_s + timer.last, interval_steps + 1

            # log
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                tc.log_train(log, bar, model, opt, device, step=it, loss=loss, lr=lr,
                             ms=1000 * interval_s / interval_steps, items_per_step=tokens_per_step,
                             unit="tok", tokens=it * tokens_per_step, train_s=train_s,
                             wall_s=time.time() - t_start)
                interval_s, interval_steps = 0.0, 0
            if stop.requested:
                save()
                status = "stopped"
                break
    bar.close()
    log.write(event="end", step=it, status=status, train_s=train_s)
    log.close()
    if status == "finished" and cfg.sample_tokens:
        model.eval()
        start = torch.tensor([data.encode("\n")], device=device)
        with ctx:
            text = data.decode(model.generate(start, cfg.sample_tokens)[0].tolist())
        print(f"--- sample ---\n{text}\n--------------")
        with open(os.path.join(run_dir, "sample.txt"), "w") as f:
            f.write(text)
    return tc.finish_run(status, it, run_dir, "nanogpt_sai.py")


def main(argv):
    return tc.main(argv, resolve_config, train, __file__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
