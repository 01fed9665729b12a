"""A small Megatron-style MoE decoder with expert parallelism, for CPU training on gloo.

Each layer: RMSNorm -> causal multi-head attention -> RMSNorm -> MoE feed-forward. The MoE block
has shared experts (every token) and fine-grained routed experts (each token's top-k by router
score, dropless: no capacity limit, no token dropped), with the Switch-style load-balance loss and
the router z-loss. Tensor and pipeline parallel sizes are 1.

Expert parallelism as Megatron lays it out: the ranks of an expert-parallel group hold disjoint
slices of the routed experts. Tokens of the whole group are gathered, each rank runs its own
experts on the tokens routed to them, and a sum over the group gives every rank the combined
output for its own tokens (collectives with autograd, so gradients flow back the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """The ``[model]`` table of ``ckpt train --config``: the MoE decoder's shape.

    Attributes:
        vocab: vocabulary size (token ids in the data must be below it).
        d_model: hidden size.
        n_layers: decoder blocks, each attention + MoE.
        n_heads: attention heads.
        seq_len: tokens per sample.
        n_experts: routed (fine-grained) experts per MoE layer; divisible by ``ep``.
        expert_hidden: hidden size of one routed expert.
        n_shared_experts: experts every token goes through.
        shared_hidden: hidden size of one shared expert.
        top_k: routed experts per token (dropless).
        aux_loss_coef: weight of the Switch load-balance loss.
        z_loss_coef: weight of the router z-loss.
    """

    vocab: int = 32_768
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    n_experts: int = 8  # routed, fine-grained
    expert_hidden: int = 64
    n_shared_experts: int = 1
    shared_hidden: int = 128
    top_k: int = 2
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Expert(nn.Module):
    """A SwiGLU feed-forward expert."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class MoE(nn.Module):
    """Shared experts plus this rank's slice of the routed experts.

    Args:
        ep_group: the expert-parallel process group (None: every expert is local).
        ep_rank, ep_size: this rank's place in it.
    """

    def __init__(self, cfg: ModelConfig, ep_group: Any = None, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        if cfg.n_experts % ep_size:
            raise ValueError(f"{cfg.n_experts} experts do not split over {ep_size} EP ranks")
        self.cfg = cfg
        self.ep_group, self.ep_rank, self.ep_size = ep_group, ep_rank, ep_size
        self.local_count = cfg.n_experts // ep_size
        self.first_expert = ep_rank * self.local_count
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.shared = nn.ModuleList(
            Expert(cfg.d_model, cfg.shared_hidden) for _ in range(cfg.n_shared_experts)
        )
        # named by global expert id, so checkpoints do not depend on the EP layout
        self.experts = nn.ModuleDict(
            {
                str(self.first_expert + j): Expert(cfg.d_model, cfg.expert_hidden)
                for j in range(self.local_count)
            }
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(cfg.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        # load balance (Switch): experts' token fractions times their mean router probability
        fraction = F.one_hot(chosen, cfg.n_experts).sum(1).float().mean(0) / cfg.top_k
        aux = cfg.n_experts * (fraction * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        routed = self._routed(tokens, weights, chosen)
        shared = sum((e(tokens) for e in self.shared), torch.zeros_like(tokens))
        out = (shared + routed).view_as(x)
        return out, cfg.aux_loss_coef * aux + cfg.z_loss_coef * z_loss

    def _routed(
        self, tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
    ) -> torch.Tensor:
        if self.ep_size > 1:
            all_tokens = GatherRows.apply(tokens, self.ep_group, self.ep_rank, self.ep_size)
            all_weights = GatherRows.apply(weights, self.ep_group, self.ep_rank, self.ep_size)
            all_chosen = _gather(chosen, self.ep_group, self.ep_size)
        else:
            all_tokens, all_weights, all_chosen = tokens, weights, chosen
        out = torch.zeros_like(all_tokens)
        for name, expert in self.experts.items():
            hit = all_chosen == int(name)  # (tokens, k): dropless, every routed token
            rows = hit.any(-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                out = out + 0.0 * sum(p.sum() for p in expert.parameters())  # keep grads defined
                continue
            gate = (all_weights[rows] * hit[rows]).sum(-1, keepdim=True)
            out = out.index_add(0, rows, gate * expert(all_tokens[rows]))
        if self.ep_size > 1:
            out = SumRows.apply(out, self.ep_group, self.ep_rank, self.ep_size)
        return out


def _gather(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class GatherRows(torch.autograd.Function):
    """All-gather along rows; backward sums the gradient over the group and keeps this rank's
    rows (a reduce-scatter built from all-reduce, which gloo has)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        return _gather(x, group, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None, None


class SumRows(torch.autograd.Function):
    """Sum over the group, keep this rank's rows; backward gathers the rows' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.size = group, size
        total = x.contiguous().clone()
        dist.all_reduce(total, group=group)
        rows = x.shape[0] // size
        return total[rank * rows : (rank + 1) * rows]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return _gather(grad, ctx.group, ctx.size), None, None, None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, **ep: Any) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model)
        self.moe = MoE(cfg, **ep)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x))
        y, aux = self.moe(self.norm2(x))
        return x + y, aux


class MoEDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, **ep: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, **ep) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self._init()

    def _init(self) -> None:
        # the same dense weights on every rank; an expert's weights depend only on its id
        for name, p in self.named_parameters():
            gen = torch.Generator().manual_seed(_seed_of(name))
            if p.dim() == 1:
                continue
            nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]), generator=gen)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(idx)
        aux_total = torch.zeros(())
        for block in self.blocks:
            x, aux = block(x)
            aux_total = aux_total + aux
        logits = self.head(self.norm(x))
        lm = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return lm, aux_total


def is_expert_param(name: str) -> bool:
    return ".moe.experts." in name


def _seed_of(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())
