#!/usr/bin/env python3
"""A test-side model with the authors' SUBLLM module layout (XiaoMi/subllm,
modeling/modeling_subllm_inference.py), written here from its documented semantics: the
same parameter and buffer names, so a state dict loads into it with a strict
load_state_dict exactly as into theirs, and their inference-mode forward.

Their semantics followed here (docs/DESIGN.md, "The authors' model format"):
  - RMSNorm eps is always 1e-5 (their RMSNorm receives LayerNorm's default); norm_eps is
    not read.
  - decoder.downsamplers.j belongs to the j-th '(' of the structure, decoder.bypasses.k to
    the k-th ')' (an inner segment closes first).
  - every block carries the buffer decoder.layers.i.self_attn.position.inv_freq =
    1 / 10000^(2i / head_dim); RoPE base 10000, rotate-half pairs (i, i + head_dim/2).
  - a tied model shares one tensor between decoder.embed_tokens.weight and
    decoder.output_projection.weight, and its state dict names it twice.
  - inference mode: a subsampler keeps every token whose score is > 0 and that is not the
    padding token (at the outermost level, where padding can appear), in order; the kept
    tokens run the inner layers at RoPE positions equal to their row indices within the
    sequence the subsampler received (the parent segment's kept tokens: in a nested segment
    these are not the original positions); upsampling blends them back by clamp(score, 0, 1);
    the bypass mixes per channel. Keys that are padding tokens are masked in the outer
    attention. One sequence at a time.

Usage: /usr/bin/python3 tests/oracle/authors_reference.py DIR [--make SEED] [--no-buffers]
                                                           [--no-head] [--compare F32_FILE]

  DIR/config.json      the authors' config (their keys; norm_eps and rope_base are ignored)
  DIR/tokens.json      a list of token-id lists (one sequence each); without it no logits
  --make SEED          first write DIR/model.safetensors: random weights in their state-dict
                       layout (F32), with the inv_freq buffers unless --no-buffers and, for a
                       tied model, the output projection's second name unless --no-head
  Then DIR/model.safetensors is loaded with load_state_dict(strict=True) (exit 2 with the
  message when that fails) and DIR/logits.safetensors gets logits/<s> (T, V) per sequence.
  --compare F32_FILE   also checks that every tensor of DIR/model.safetensors equals torch's
                       conversion to its dtype of the same tensor in F32_FILE (exit 3 if not).
"""

import argparse
import json
import math
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference as ref  # noqa: E402  (safetensors I/O)

NORM_EPS = 1e-5
ROPE_BASE = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight


class Rotary(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        inv = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv)

    def forward(self, x, positions):  # x (H, N, hd), positions (N,)
        ang = positions.to(x.dtype)[:, None] * self.inv_freq.to(x.dtype)[None, :]
        ang = torch.cat((ang, ang), dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * ang.cos() + rotated * ang.sin()


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.Linear(d, d, bias=False))
        self.position = Rotary(d // heads)

    def forward(self, x, positions, key_mask):
        N, d = x.shape
        hd = d // self.heads

        def split(t):
            return t.view(N, self.heads, hd).transpose(0, 1)

        q = self.position(split(self.q_proj(x)), positions)
        k = self.position(split(self.k_proj(x)), positions)
        v = split(self.v_proj(x))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        allowed = torch.ones(N, N, dtype=torch.bool).tril()
        if key_mask is not None:
            allowed = allowed & ~key_mask[None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        return self.out_proj((p @ v).transpose(0, 1).reshape(N, d))


class SwiGLU(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * ffn, bias=False)
        self.w3 = nn.Linear(ffn, d, bias=False)
        self.ffn = ffn

    def forward(self, x):
        gu = self.w12(x)
        return self.w3(nn.functional.silu(gu[..., :self.ffn]) * gu[..., self.ffn:])


class FeedForward(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.swiglu = SwiGLU(d, ffn)

    def forward(self, x):
        return self.swiglu(x)


class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.self_attn_layer_norm = RMSNorm(d)
        self.self_attn = Attention(d, heads)
        self.final_layer_norm = RMSNorm(d)
        self.feedforward = FeedForward(d, ffn)

    def forward(self, x, positions, key_mask):
        h = x + self.self_attn(self.self_attn_layer_norm(x), positions, key_mask)
        return h + self.feedforward(self.final_layer_norm(h))


class Downsampler(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.to_scores = nn.Linear(d, 1, bias=False)


class Bypass(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((d,), 0.5))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        V, d = cfg["num_embeddings"], cfg["decoder_embed_dim"]
        self.structure = cfg["structure"]
        self.padding_idx = cfg.get("padding_idx", 0)
        self.embed_tokens = nn.Embedding(V, d, padding_idx=self.padding_idx)
        self.layers = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        self.bypasses = nn.ModuleList()
        for ch in self.structure:
            if ch == "T":
                self.layers.append(Block(d, cfg["decoder_attention_heads"], cfg["decoder_ffn_embed_dim"]))
            elif ch == "(":
                self.downsamplers.append(Downsampler(d))
            else:
                self.bypasses.append(Bypass(d))
        self.layer_norm = RMSNorm(d)
        self.output_projection = nn.Linear(d, V, bias=False)
        if cfg.get("tie_weights", True):
            self.output_projection.weight = self.embed_tokens.weight

    def forward(self, tokens):  # one sequence (N,)
        x = self.embed_tokens(tokens)
        positions = torch.arange(len(tokens))
        pad = tokens == self.padding_idx
        key_mask = pad if bool(pad.any()) else None
        n_layer = n_down = n_up = 0
        saved = []
        for ch in self.structure:
            if ch == "T":
                if x.shape[0] > 0:
                    x = self.layers[n_layer](x, positions, key_mask)
                n_layer += 1
            elif ch == "(":
                s = self.downsamplers[n_down].to_scores(x)[:, 0]
                n_down += 1
                keep = s > 0
                if key_mask is not None:
                    keep = keep & ~key_mask
                idx = keep.nonzero()[:, 0]
                saved.append((x, idx, s.clamp(0.0, 1.0)[idx], positions, key_mask))
                # Their rule: positions are the kept rows' indices in the parent sequence.
                x, positions, key_mask = x[idx], idx, None
            else:
                x_orig, idx, w, positions, key_mask = saved.pop()
                u = x_orig.clone()
                u[idx] = w[:, None] * x + (1.0 - w[:, None]) * x_orig[idx]
                c = self.bypasses[n_up].bypass_scale
                n_up += 1
                x = x_orig + c * (u - x_orig)
        return self.output_projection(self.layer_norm(x))


class AuthorsModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.decoder = Decoder(cfg)


def read_config(path):
    with open(path) as f:
        raw = json.load(f)
    if raw.get("qk_bias", True):
        raise ref.ReferenceError(f"{path}: qk_bias true is not modelled here")
    raw.setdefault("structure", "T" * raw["decoder_layers"])
    return raw


def make_weights(model, seed, path, buffers, head):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bypass_scale"):
                p.uniform_(0.3, 1.0)
            elif p.dim() == 1:
                p.normal_(1.0, 0.1)
            elif name.endswith("to_scores.weight"):
                # Scores around zero, so each subsampler keeps some tokens and drops others.
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 0.4 / math.sqrt(p.shape[1]))
    sd = model.state_dict()
    if not buffers:
        sd = {k: v for k, v in sd.items() if not k.endswith(".inv_freq")}
    if not head and model.decoder.output_projection.weight is model.decoder.embed_tokens.weight:
        sd.pop("decoder.output_projection.weight")
    ref.write_safetensors(path, {k: v.float() for k, v in sd.items()}, {"format": "pt"})


def compare_dtypes(path, f32_path):
    """Every tensor of `path` against torch's conversion of the F32 original to its dtype."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    got, _ = ref.read_safetensors(path)
    want, _ = ref.read_safetensors(f32_path)
    to = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    bad = []
    for name, info in header.items():
        if name not in want:
            continue
        w = torch.tensor(want[name]).to(to[info["dtype"]]).float()
        if not torch.equal(w, torch.tensor(got[name])):
            bad.append(name)
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--make", type=int)
    ap.add_argument("--no-buffers", action="store_true")
    ap.add_argument("--no-head", action="store_true")
    ap.add_argument("--compare")
    a = ap.parse_args(argv)
    cfg = read_config(os.path.join(a.dir, "config.json"))
    model = AuthorsModel(cfg)
    weights = os.path.join(a.dir, "model.safetensors")
    if a.make is not None:
        make_weights(model, a.make, weights, not a.no_buffers, not a.no_head)
    arrays, _ = ref.read_safetensors(weights)
    model = model.double()
    if a.make is not None:
        # A fixture written without buffers or the tied head's second name still runs: what it
        # lacks is what the module holds already.
        for k, v in model.state_dict().items():
            arrays.setdefault(k, v.numpy())
    try:
        model.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}, strict=True)
    except RuntimeError as e:
        print(f"authors_reference.py: strict load failed: {e}", file=sys.stderr)
        return 2
    if a.compare:
        bad = compare_dtypes(weights, a.compare)
        if bad:
            print(f"authors_reference.py: values differ from torch's conversion: {bad}", file=sys.stderr)
            return 3
    tokens = os.path.join(a.dir, "tokens.json")
    if not os.path.exists(tokens):
        return 0
    with open(tokens) as f:
        seqs = json.load(f)
    out = {}
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            out[f"logits/{i}"] = model.decoder(torch.tensor(seq, dtype=torch.long)).float()
    ref.write_safetensors(os.path.join(a.dir, "logits.safetensors"), out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ref.ReferenceError as e:
        print(f"authors_reference.py: {e}", file=sys.stderr)
        sys.exit(1)
