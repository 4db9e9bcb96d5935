"""A tiny transformer LM for optimizer tests, named the way the official Adam-mini 1.1.1
recognises (q_proj/k_proj/v_proj/o_proj, mlp, embed, lm_head), with unfused attention."""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Block(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        q, k, v = (rearrange(proj(h), "b t (h d) -> b h t d", h=self.n_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(rearrange(y, "b h t d -> b t (h d)"))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=32, n_heads=4, n_layers=2, block_size=16):
        super().__init__()
        self.n_head = n_heads
        self.embed = nn.Embedding(vocab, dim)
        self.wpe = nn.Parameter(0.02 * torch.randn(block_size, dim))
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.norm_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx) + self.wpe[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))

    def param_kinds(self):
        kinds = {self.embed.weight: "embedding", self.wpe: "position",
                 self.lm_head.weight: "head", self.norm_f.weight: "norm", self.norm_f.bias: "bias"}
        for b in self.blocks:
            kinds.update({b.q_proj.weight: "qk", b.k_proj.weight: "qk", b.v_proj.weight: "v",
                          b.o_proj.weight: "proj"})
            kinds.update({p: "mlp" if p.dim() == 2 else "bias" for p in b.mlp.parameters()})
            kinds.update({n.weight: "norm" for n in (b.norm1, b.norm2)})
            kinds.update({n.bias: "bias" for n in (b.norm1, b.norm2)})
        return kinds


def make_model(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw).to(dtype)


def batches(n, vocab=50, batch=8, block_size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (batch, block_size + 1), generator=g) for _ in range(n)]


def train(model, optimizer, data):
    """Run one step per batch; return the losses."""
    losses = []
    for xy in data:
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def max_rel_diff(model_a, model_b):
    """Largest ||a - b|| / ||b|| over the parameter tensors of two models."""
    return max(((a - b).norm() / b.norm()).item()
               for a, b in zip(model_a.parameters(), model_b.parameters()))


def train_scheduled(model, optimizer, data):
    """`train` under an lr that changes every step (a warmup over 10), so the tests cover
    schedulers too; `optimizer` may be several, stepped together (a list)."""
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 10))
                  for o in optimizers]
    losses = []
    for xy in data:
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten())
        loss.backward()
        for o, s in zip(optimizers, schedulers):
            o.step()
            o.zero_grad(set_to_none=True)
            s.step()
        losses.append(loss.item())
    return losses
