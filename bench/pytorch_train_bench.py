#!/usr/bin/env python3
"""PyTorch peer for the subllm training benchmark.

Usage:
  /usr/bin/python3 bench/pytorch_train_bench.py --config CONFIG.json --seq T --batch B \
      --steps N --threads 2 [--warmup 1] [--seed 0]

Trains the LLaMA of CONFIG.json (float32) with AdamW (lr 3e-4, weight decay 0.1 on
matrices) on random tokens and prints one JSON line with throughput. Per-step
progress goes to stderr.

FLOPs (shared with the C++ bench): flops_per_token = 6 * P_mat + 6 * L * T * d,
P_mat = L * (4 d^2 + 3 d F) + V d (output projection counted even when tied).
"""

import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = d // heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q = rotate_half_rope(q, cos, sin)
        k = rotate_half_rope(k, cos, sin)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(mask, float("-inf"))
        y = F.softmax(scores, dim=-1) @ v
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * ffn, bias=False)
        self.w3 = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        g, u = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(g) * u)


class FeedForward(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.swiglu = SwiGLU(d, ffn)

    def forward(self, x):
        return self.swiglu(x)


class Block(nn.Module):
    def __init__(self, d, heads, ffn, eps):
        super().__init__()
        self.self_attn_layer_norm = RMSNorm(d, eps)
        self.self_attn = Attention(d, heads)
        self.final_layer_norm = RMSNorm(d, eps)
        self.feedforward = FeedForward(d, ffn)

    def forward(self, x, cos, sin, mask):
        h = x + self.self_attn(self.self_attn_layer_norm(x), cos, sin, mask)
        return h + self.feedforward(self.final_layer_norm(h))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        V, d = cfg["num_embeddings"], cfg["decoder_embed_dim"]
        self.embed_tokens = nn.Embedding(V, d)
        self.layers = nn.ModuleList(
            Block(d, cfg["decoder_attention_heads"], cfg["decoder_ffn_embed_dim"], cfg["norm_eps"])
            for _ in range(cfg["decoder_layers"]))
        self.layer_norm = RMSNorm(d, cfg["norm_eps"])
        self.tie = cfg["tie_weights"]
        if not self.tie:
            self.output_projection = nn.Linear(d, V, bias=False)
        self.head_dim = d // cfg["decoder_attention_heads"]
        self.rope_base = cfg["rope_base"]
        self._rope_cache = {}

    def rope(self, T):
        # Tables depend only on T; built once so every step pays the same work.
        if T not in self._rope_cache:
            half = self.head_dim // 2
            inv = self.rope_base ** (-2.0 * torch.arange(half, dtype=torch.float64) / self.head_dim)
            ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
            self._rope_cache[T] = (ang.cos().float(), ang.sin().float(), mask)
        return self._rope_cache[T]

    def forward(self, tokens):
        cos, sin, mask = self.rope(tokens.shape[1])
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.layer_norm(x)
        w = self.embed_tokens.weight if self.tie else self.output_projection.weight
        return F.linear(x, w)


class LLaMA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.decoder = Decoder(cfg)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, tokens):
        return self.decoder(tokens)


def load_config(path):
    with open(path) as f:
        raw = json.load(f)
    cfg = {}
    for key in ("num_embeddings", "decoder_embed_dim", "decoder_ffn_embed_dim",
                "decoder_layers", "decoder_attention_heads"):
        if key not in raw:
            raise SystemExit(f"pytorch_train_bench: {path}: missing required key {key!r}")
        cfg[key] = int(raw[key])
    if cfg["decoder_embed_dim"] % cfg["decoder_attention_heads"]:
        raise SystemExit("pytorch_train_bench: decoder_embed_dim not divisible by heads")
    structure = raw.get("structure")
    if structure is not None and set(structure) - {"T"}:
        raise SystemExit(f"pytorch_train_bench: structure {structure!r} is not plain LLaMA")
    cfg["tie_weights"] = bool(raw.get("tie_weights", False))
    cfg["norm_eps"] = float(raw.get("norm_eps", 1e-6))
    cfg["rope_base"] = float(raw.get("rope_base", 10000.0))
    return cfg


def main():
    ap = argparse.ArgumentParser(description="PyTorch LLaMA training throughput")
    ap.add_argument("--config", required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1 or args.seq < 1 or args.batch < 1 or args.warmup < 0:
        raise SystemExit("pytorch_train_bench: --steps, --seq, --batch must be >= 1")

    cfg = load_config(args.config)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = LLaMA(cfg)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)

    V, d, Fd, L = (cfg["num_embeddings"], cfg["decoder_embed_dim"],
                   cfg["decoder_ffn_embed_dim"], cfg["decoder_layers"])
    T, B = args.seq, args.batch
    p_mat = L * (4 * d * d + 3 * d * Fd) + V * d
    flops_per_token = 6 * p_mat + 6 * L * T * d

    gen = torch.Generator().manual_seed(args.seed + 1)

    def step(i, phase):
        data = torch.randint(0, V, (B, T + 1), generator=gen)
        tokens, targets = data[:, :-1], data[:, 1:]
        t0 = time.perf_counter()
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = loss.item()
        dt = time.perf_counter() - t0
        print(f"{phase} step {i + 1}: loss {lv:.4f} {dt:.3f} s {B * T / dt:.1f} tok/s",
              file=sys.stderr, flush=True)
        return dt

    model.train()
    for i in range(args.warmup):
        step(i, "warmup")
    times = [step(i, "timed") for i in range(args.steps)]

    total = sum(times)
    tokens_per_s = B * T * args.steps / total
    print(json.dumps({
        "impl": "pytorch",
        "torch_version": torch.__version__,
        "seq": T,
        "batch": B,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "tokens_per_s": round(tokens_per_s, 3),
        "step_s": round(total / args.steps, 6),
        "gflops": round(flops_per_token * tokens_per_s / 1e9, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": n_params,
    }), flush=True)


if __name__ == "__main__":
    main()
