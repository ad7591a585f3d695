#!/usr/bin/env python3
"""PyTorch peer of the subllm GPU training benchmark (LLaMA and SUBLLM).

Usage:
  python3 bench/pytorch_gpu_bench.py --config CONFIG.json --seq T --batch B --steps N \
      [--warmup 2] [--seed 0] [--device cuda] [--compile]

Trains the model of CONFIG.json on random tokens (drawn on the device every step) and
prints one JSON line to stdout; per-step progress goes to stderr. JSON keys: impl,
torch_version, device, dtype, layout (llama | subllm), structure, seq, batch, steps,
tokens_per_s, step_s, tflops, peak_mem_mb (torch.cuda.max_memory_allocated on cuda,
ru_maxrss on cpu), params, flops_per_token, compiled, fused_adamw, sdpa.

Training setup: fp32 master weights, bf16 autocast, attention through
F.scaled_dot_product_attention(is_causal=True) (a plain masked softmax when this torch
has none), cross-entropy in fp32 on the logits, AdamW (fused on cuda) with lr 3e-4,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices. As in the engine, the score
layers are not decayed and learn at half the rate; norm gains and bypass scales are not
decayed. Each step is timed between two device synchronisations.

Model (docs/DESIGN.md, ../shared/docs/SUBLLM.md):
  - pre-norm blocks: RMSNorm (weight only, eps = norm_eps), attention without biases with
    rotate-half RoPE (base rope_base) at the tokens' original positions, SwiGLU with the
    fused w12 (gate | up) and w3; final RMSNorm; tied or untied head.
    q, k and v are one (3d, d) matrix, as the engine stores them (one GEMM).
  - subsampler j (the j-th '('): scores s = to_scores(x) (Linear(d, 1), computed in fp32);
    each sequence keeps its top Tc = ceil(Tp * r) tokens (ranked by a stable descending
    sort, so ties go to the earlier token as in the engine), in sequence order; w_scale of
    the kept token of score rank k is clamp(s, 0, 1) minus that of the token at rank
    Tc + k (0 past the end); with probability 0.5 per step and subsampler the pairing is
    reversed (rank Tc + (Tc - 1 - k)). The inner items run on the gathered rows; then
    upsample + bypass: out = x + c * w_scale * (y - x) on the kept rows, x elsewhere,
    c the per-channel bypass scale (init 0.5).
  - not implemented: the score balancer and the bypass-scale gradient limit. Both only
    edit gradients (identity in the forward) and cost little; the pairing flip is kept.
  - initialisation as the engine: embedding normal(0, d^-0.5) with the padding row 0;
    qkv, w12 truncated normal(0, 0.006); out_proj and w3 of block i truncated normal with
    sd 0.006 / sqrt(2 (i + 1)); untied head and score layers PyTorch's Linear default.

FLOPs (as Model::train_flops_per_token): 6 V d + sum over blocks of
frac * (6 (4 d^2 + 3 d F) + 6 len d), len = the block's segment length per sequence in
training (ceil(T r), nested), frac = len / T. tflops = flops_per_token * tokens_per_s / 1e12.
"""

import argparse
import json
import math
import resource
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from pytorch_train_bench import SwiGLU  # the CPU peer's feed-forward, fused w12 and w3

PROG = "pytorch_gpu_bench"


def fail(msg):
    raise SystemExit(f"{PROG}: {msg}")


# ---------------------------------------------------------------------------
# config

def _f32(v):
    # The engine keeps retentions as float32; kept lengths follow that rounding.
    return struct.unpack("f", struct.pack("f", float(v)))[0]


def _read_int(raw, path, key, default):
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            isinstance(v, float) and (not math.isfinite(v) or v != math.floor(v))):
        fail(f"{path}: {key} must be an integer, got {v!r}")
    v = int(v)
    if not -2**31 <= v < 2**31:
        fail(f"{path}: {key} must be an integer that fits in 32 bits, got {v}")
    return v


def _read_float(raw, path, key, default):
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        fail(f"{path}: {key} must be a number, got {v!r}")
    return float(v)


def _read_str(raw, path, key, default):
    v = raw.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        fail(f"{path}: {key} must be a string, got {v!r}")
    return v


def _read_retentions(raw, path):
    key = "downsampling_factor_denominator"
    v = raw.get(key)
    if v is None:
        return []
    if isinstance(v, bool):
        fail(f"{path}: {key} must be a number, a string like \"0.64\" or \"0.64,0.5\", or a list")
    if isinstance(v, (int, float)):
        items = [v]
    elif isinstance(v, str):
        items = v.split(",") if v.strip() else []
    elif isinstance(v, list):
        items = v
    else:
        fail(f"{path}: {key} must be a number, a string like \"0.64\" or \"0.64,0.5\", or a list")
    out = []
    for it in items:
        if isinstance(it, str):
            try:
                out.append(float(it.strip()))
            except ValueError:
                fail(f"{path}: {key} entry {it!r} is not a number: write the kept fraction "
                     "per subsampler, e.g. \"0.64\" or \"0.64,0.5\"")
        elif isinstance(it, (int, float)) and not isinstance(it, bool):
            out.append(float(it))
        else:
            fail(f"{path}: {key} must be a list of numbers, got {v!r}")
    return out


def parse_structure(text, n_layers, retentions, path):
    """Layout string -> (root item list, number of subsamplers).

    An item is ("T", block index) or ("S", subsampler index, retention, child items);
    blocks are numbered by their 'T', subsamplers by their '('."""
    if not text:
        fail(f"{path}: structure is empty: write one 'T' per block, e.g. {'T' * max(n_layers, 1)!r}")
    root = []
    stack = [(root, -1)]
    below = [0]  # blocks anywhere inside each open segment
    subs = []    # child lists in '(' order, to attach retentions
    n_blocks = 0
    for i, ch in enumerate(text):
        if ch == "T":
            stack[-1][0].append(("T", n_blocks))
            n_blocks += 1
            below = [b + 1 for b in below]
        elif ch == "(":
            child = []
            stack[-1][0].append(["S", len(subs), None, child])
            subs.append(stack[-1][0][-1])
            stack.append((child, i))
            below.append(0)
        elif ch == ")":
            if len(stack) == 1:
                fail(f"{path}: structure {text!r}: unbalanced ')' at position {i + 1}")
            if below[-1] == 0:
                fail(f"{path}: structure {text!r}: empty segment at position "
                     f"{stack[-1][1] + 1}: put at least one 'T' inside every pair of parentheses")
            stack.pop()
            below.pop()
        else:
            fail(f"{path}: structure {text!r}: invalid character {ch!r} at position {i + 1}: "
                 "use only 'T', '(' and ')'")
    if len(stack) > 1:
        fail(f"{path}: structure {text!r}: unbalanced '(' at position {stack[-1][1] + 1}")
    if n_blocks != n_layers:
        fail(f"{path}: structure has {n_blocks} 'T' blocks but decoder_layers is {n_layers}: "
             "make them equal")
    n = len(subs)
    if n:
        key = "downsampling_factor_denominator"
        if not retentions:
            fail(f"{path}: structure {text!r} has {n} subsampler(s) but {key} is missing: "
                 "set it to the fraction of tokens each subsampler keeps, e.g. \"0.64\"")
        if len(retentions) not in (1, n):
            fail(f"{path}: {key} has {len(retentions)} values but structure {text!r} has {n} "
                 "subsamplers: give one value for all of them or one per '('")
        for r in retentions:
            if not (0.0 < r <= 1.0):
                fail(f"{path}: {key} value {r} is outside (0, 1]")
        for j, item in enumerate(subs):
            item[2] = _f32(retentions[0] if len(retentions) == 1 else retentions[j])
    freeze = lambda items: [tuple(it) if it[0] == "T" else ("S", it[1], it[2], freeze(it[3]))
                            for it in items]
    return freeze(root), n


def load_config(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read config {path!r}: {e.strerror}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{path}: invalid JSON: {e}")
    if not isinstance(raw, dict):
        fail(f"{path}: the top level must be a JSON object")
    # Missing keys keep the engine's defaults (include/subllm/config.h).
    c = {
        "num_embeddings": _read_int(raw, path, "num_embeddings", 8192),
        "decoder_embed_dim": _read_int(raw, path, "decoder_embed_dim", 512),
        "decoder_ffn_embed_dim": _read_int(raw, path, "decoder_ffn_embed_dim", 1376),
        "decoder_layers": _read_int(raw, path, "decoder_layers", 8),
        "decoder_attention_heads": _read_int(raw, path, "decoder_attention_heads", 8),
        "tokens_per_sample": _read_int(raw, path, "tokens_per_sample", 1024),
        "padding_idx": _read_int(raw, path, "padding_idx", 0),
        "bos_token_id": _read_int(raw, path, "bos_token_id", 1),
        "eos_token_id": _read_int(raw, path, "eos_token_id", 2),
        "norm_eps": _read_float(raw, path, "norm_eps", 1e-6),
        "rope_base": _read_float(raw, path, "rope_base", 10000.0),
        "norm_name": _read_str(raw, path, "norm_name", "rmsnorm"),
        "mlp_name": _read_str(raw, path, "mlp_name", "swiglu"),
        "structure": _read_str(raw, path, "structure", ""),
    }
    tie = raw.get("tie_weights", False)
    if tie is None:
        tie = False
    if not isinstance(tie, bool):
        fail(f"{path}: tie_weights must be true or false, got {tie!r}")
    c["tie_weights"] = tie
    for key in ("num_embeddings", "decoder_embed_dim", "decoder_ffn_embed_dim",
                "decoder_layers", "decoder_attention_heads", "tokens_per_sample"):
        if c[key] <= 0:
            fail(f"{path}: {key} ({c[key]}) must be positive")
    d, h = c["decoder_embed_dim"], c["decoder_attention_heads"]
    if d % h:
        fail(f"{path}: decoder_embed_dim ({d}) is not divisible by decoder_attention_heads ({h})")
    if (d // h) % 2:
        fail(f"{path}: head size decoder_embed_dim / decoder_attention_heads = {d // h} is odd: "
             "RoPE rotates channel pairs")
    for key in ("padding_idx", "bos_token_id", "eos_token_id"):
        if not 0 <= c[key] < c["num_embeddings"]:
            fail(f"{path}: {key} ({c[key]}) is outside [0, num_embeddings = {c['num_embeddings']})")
    if not (c["norm_eps"] > 0 and math.isfinite(c["norm_eps"])):
        fail(f"{path}: norm_eps ({c['norm_eps']}) must be a small positive number, e.g. 1e-6")
    if not (c["rope_base"] > 0 and math.isfinite(c["rope_base"])):
        fail(f"{path}: rope_base ({c['rope_base']}) must be positive, e.g. 10000")
    if c["norm_name"] != "rmsnorm":
        fail(f"{path}: norm_name {c['norm_name']!r} is not supported: only \"rmsnorm\"")
    if c["mlp_name"] != "swiglu":
        fail(f"{path}: mlp_name {c['mlp_name']!r} is not supported: only \"swiglu\"")
    layout = c["structure"] or "T" * c["decoder_layers"]
    c["layout"] = layout
    c["items"], c["num_subsamplers"] = parse_structure(
        layout, c["decoder_layers"], _read_retentions(raw, path), path)
    return c


def kept_length(t, r):
    # Same rounding as the engine's kept_length (src/model/session.cpp).
    return max(1, math.ceil(t * r - 1e-6))


def flops_per_token(cfg, T):
    C, Fd, V = cfg["decoder_embed_dim"], cfg["decoder_ffn_embed_dim"], cfg["num_embeddings"]
    total = 6.0 * V * C

    def walk(items, length):
        nonlocal total
        frac = length / T
        for it in items:
            if it[0] == "T":
                total += frac * (6.0 * (4 * C * C + 3 * C * Fd) + 6.0 * length * C)
            else:
                walk(it[3], kept_length(length, it[2]))

    walk(cfg["items"], T)
    return total


# ---------------------------------------------------------------------------
# model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    # x: (B, H, T, hd); cos, sin: broadcastable to (B, 1, T, hd/2). Pairs (i, i + hd/2).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


_HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def causal_attention(q, k, v):
    if _HAS_SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # torch < 2.0: masked softmax.
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    p = s.masked_fill(mask, float("-inf")).softmax(-1)
    return p.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = causal_attention(rope(q, cos, sin), rope(k, cos, sin), v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d, heads, ffn, eps):
        super().__init__()
        self.self_attn_layer_norm = RMSNorm(d, eps)
        self.self_attn = Attention(d, heads)
        self.final_layer_norm = RMSNorm(d, eps)
        self.swiglu = SwiGLU(d, ffn)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.self_attn_layer_norm(x), cos, sin)
        return h + self.swiglu(self.final_layer_norm(h))


class Subsampler(nn.Module):
    """Score layer of a '(' and bypass scale of its ')'."""

    def __init__(self, d):
        super().__init__()
        self.to_scores = nn.Linear(d, 1, bias=False)
        self.bypass_scale = nn.Parameter(torch.full((d,), 0.5))

    def select(self, x, tc, flip):
        """x: (B, Tp, d). Returns kept indices (B, tc) ascending and w_scale (B, tc)."""
        Tp = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            s = F.linear(x.float(), self.to_scores.weight).squeeze(-1)  # (B, Tp)
        k2 = min(2 * tc, Tp)
        # Rank by score, equal scores in sequence order (as the engine's stable sort;
        # topk's order among ties is unspecified, and equal tokens give equal scores).
        top_i = torch.sort(s.detach(), dim=1, descending=True, stable=True).indices[:, :k2]
        w = s.gather(1, top_i).clamp(0.0, 1.0)
        w_kept, w_disc = w[:, :tc], w[:, tc:]
        if k2 < 2 * tc:
            w_disc = F.pad(w_disc, (0, 2 * tc - k2))
        w_disc = torch.where(flip, w_disc.flip(1), w_disc)
        kept, perm = top_i[:, :tc].sort(dim=1)
        return kept, (w_kept - w_disc).gather(1, perm)

    def upsample(self, x, y, kept, w_scale):
        """out = x + c * w_scale * (y - x[kept]) on the kept rows, x elsewhere."""
        idx = kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        delta = self.bypass_scale * w_scale.unsqueeze(-1) * (y - x.gather(1, idx))
        return x.scatter_add(1, idx, delta)


class Model(nn.Module):
    def __init__(self, cfg, max_seq):
        super().__init__()
        V, d = cfg["num_embeddings"], cfg["decoder_embed_dim"]
        heads, ffn, eps = cfg["decoder_attention_heads"], cfg["decoder_ffn_embed_dim"], cfg["norm_eps"]
        self.items = cfg["items"]
        self.tie = cfg["tie_weights"]
        self.embed_tokens = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Block(d, heads, ffn, eps) for _ in range(cfg["decoder_layers"]))
        self.subsamplers = nn.ModuleList(Subsampler(d) for _ in range(cfg["num_subsamplers"]))
        self.layer_norm = RMSNorm(d, eps)
        if not self.tie:
            self.output_projection = nn.Linear(d, V, bias=False)
        hd = d // heads
        inv = cfg["rope_base"] ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
        ang = torch.arange(max_seq, dtype=torch.float64)[:, None] * inv
        self.register_buffer("rope_cos", ang.cos().float(), persistent=False)
        self.register_buffer("rope_sin", ang.sin().float(), persistent=False)
        self._init_weights(cfg)

    @torch.no_grad()
    def _init_weights(self, cfg):
        d = cfg["decoder_embed_dim"]
        nn.init.normal_(self.embed_tokens.weight, 0.0, d ** -0.5)
        self.embed_tokens.weight[cfg["padding_idx"]].zero_()

        def tn(w, sd):
            nn.init.trunc_normal_(w, 0.0, sd, -3 * sd, 3 * sd)

        for i, blk in enumerate(self.layers):
            tn(blk.self_attn.qkv_proj.weight, 0.006)
            tn(blk.swiglu.w12.weight, 0.006)
            sd = 0.006 / math.sqrt(2.0 * (i + 1))
            tn(blk.self_attn.out_proj.weight, sd)
            tn(blk.swiglu.w3.weight, sd)

    def _segment(self, items, x, pos, flips):
        # pos: (B, T) original positions, or None for the full sequence.
        T = x.shape[1]
        if pos is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
        for it in items:
            if it[0] == "T":
                x = self.layers[it[1]](x, cos, sin)
            else:
                _, j, r, child = it
                sub = self.subsamplers[j]
                kept, w_scale = sub.select(x, kept_length(T, r), flips[j])
                xk = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                y = self._segment(child, xk, kept if pos is None else pos.gather(1, kept), flips)
                x = sub.upsample(x, y, kept, w_scale)
        return x

    def forward(self, tokens, flips):
        """tokens (B, T); flips (num_subsamplers,) bool: reversed pairing per subsampler."""
        x = self._segment(self.items, self.embed_tokens(tokens), None, flips)
        x = self.layer_norm(x)
        w = self.embed_tokens.weight if self.tie else self.output_projection.weight
        return F.linear(x, w)


def make_optimizer(model, device):
    score = [p for sub in model.subsamplers for p in sub.to_scores.parameters()]
    score_ids = {id(p) for p in score}
    rest = [p for p in model.parameters() if id(p) not in score_ids]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    if score:
        groups.append({"params": score, "weight_decay": 0.0, "lr": 1.5e-4})
    kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), True
        except (TypeError, RuntimeError) as e:
            print(f"{PROG}: fused AdamW unavailable ({e}); using the default", file=sys.stderr)
    return torch.optim.AdamW(groups, **kw), False


def train_step(model, opt, tokens, targets, flips, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(tokens, flips)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


# ---------------------------------------------------------------------------
# main

def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch LLaMA / SUBLLM training throughput (bf16)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.seq < 1 or args.batch < 1:
        fail("--steps, --seq and --batch must be >= 1")
    if args.warmup < 0:
        fail("--warmup must be >= 0")

    cfg = load_config(args.config)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        fail(f"--device {args.device!r}: {e}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail("no CUDA device: torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        fail(f"--device {args.device!r}: use cuda[:N] or cpu")
    if args.compile and not hasattr(torch, "compile"):
        fail(f"--compile needs torch.compile (torch >= 2.0); this is torch {torch.__version__}")

    torch.manual_seed(args.seed)
    model = Model(cfg, args.seq).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt, fused = make_optimizer(model, device)
    run = torch.compile(model) if args.compile else model

    V, T, B = cfg["num_embeddings"], args.seq, args.batch
    n_sub = cfg["num_subsamplers"]
    fpt = flops_per_token(cfg, T)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    cuda = device.type == "cuda"

    def step(i, phase):
        # As the engine's bench: inputs avoid id 0 (padding), targets cover the vocabulary.
        tokens = torch.randint(1, V, (B, T), generator=gen, device=device)
        targets = torch.randint(0, V, (B, T), generator=gen, device=device)
        flips = torch.rand(max(n_sub, 1), generator=gen, device=device) < 0.5
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step(run, opt, tokens, targets, flips, device)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{phase} step {i + 1}: loss {loss.item():.4f} {dt:.3f} s {B * T / dt:.1f} tok/s",
              file=sys.stderr, flush=True)
        return dt

    model.train()
    for i in range(args.warmup):
        step(i, "warmup")
    times = [step(i, "timed") for i in range(args.steps)]

    total = sum(times)
    tokens_per_s = B * T * args.steps / total
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "impl": "pytorch",
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": "bf16",
        "layout": "subllm" if n_sub else "llama",
        "structure": cfg["layout"],
        "seq": T,
        "batch": B,
        "steps": args.steps,
        "tokens_per_s": round(tokens_per_s, 3),
        "step_s": round(total / args.steps, 6),
        "tflops": round(fpt * tokens_per_s / 1e12, 6),
        "peak_mem_mb": round(peak_mb, 1),
        "params": n_params,
        "flops_per_token": fpt,
        "compiled": bool(args.compile),
        "fused_adamw": fused,
        "sdpa": _HAS_SDPA,
    }), flush=True)


if __name__ == "__main__":
    main()
