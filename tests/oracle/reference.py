#!/usr/bin/env python3
"""PyTorch reference (oracle) for one training step of subllm: LLaMA, and SUBLLM in
training mode (subsamplers, upsamplers, bypasses, score balancer, bypass gradient limit).

Usage: /usr/bin/python3 tests/oracle/reference.py DIR [--dtype float64|float32]

Inputs in DIR:
  config.json          model description (SUBLLM.md section 2 key names); `structure`
                       may hold '(' / ')' (subsamplers numbered by their '(' order, bypasses
                       by their ')' order as the authors do; "subllm_format": 1 numbers
                       bypasses by '(' as subllm did before) and then
                       `downsampling_factor_denominator` gives the retentions: one value for
                       all subsamplers or one per subsampler (number, "0.6", "0.6,0.5", list)
  model.safetensors    parameters, named as in the public checkpoints (including
                       decoder.downsamplers.j.to_scores.weight (1,d) and
                       decoder.bypasses.k.bypass_scale (d) for the k-th ')', and
                       with qk_bias (true when the key is absent, as in the authors'
                       config class) self_attn.{q,k}_proj.bias (d), added before RoPE);
                       norm_eps defaults to 1e-5, the authors' value
  batch.safetensors    tokens (B,T) int, targets (B,T) int (negative = ignored),
                       optional positions (B,T) int (default 0..T-1 per row),
                       optional step (I32 [1], global training step, default 0),
                       optional choices/j (I32 [3] = flipped, balancer_on, limit_on for
                       subsampler j, default all 0),
                       optional mask_padding (I32 [1]): when nonzero, keys whose token is
                       padding_idx are masked in the attention of the full-length layers,
                       as the authors' key_padding_mask does (a query that sees no key
                       attends to nothing: output 0)
  optim.json           optional {"lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"}

Output DIR/reference.safetensors (floats F32, integers I32):
  loss [1], logits (B,T,V), grad_norm [1] (global L2 norm before clipping),
  grad/<name> for every parameter, and with optim.json updated/<name> after
  one AdamW step (torch.optim.AdamW semantics; decay only on ndim >= 2 and never on
  to_scores / bypass_scale; to_scores uses lr x 0.5); for every subsampler j
  kept/j (B,Tc) the kept indices within the parent sequence, ascending, and
  w_scale/j (B,Tc) the matching upsampling weights.
"""

import argparse
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np
import torch


class ReferenceError(Exception):
    pass


# ----------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------

_NP_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits, widened to f32 below
}


def read_safetensors(path):
    """Returns (dict name -> numpy array, metadata dict). BF16/F16 become float32."""
    if not os.path.isfile(path):
        raise ReferenceError(f"missing file: {path}")
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ReferenceError(f"{path}: too short for a safetensors header")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ReferenceError(f"{path}: header length {n} exceeds file size {len(blob)}")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReferenceError(f"{path}: bad JSON header: {e}")
    buf = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        dt = info.get("dtype")
        if dt not in _NP_DTYPES:
            raise ReferenceError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
        shape = [int(s) for s in info["shape"]]
        b, e = (int(x) for x in info["data_offsets"])
        npdt = _NP_DTYPES[dt]
        count = int(np.prod(shape)) if shape else 1
        if e - b != count * npdt.itemsize or e > len(buf) or b < 0:
            raise ReferenceError(
                f"{path}: tensor {name!r} offsets [{b}, {e}) do not fit shape {shape} x {dt}")
        arr = np.frombuffer(buf[b:e], dtype=npdt).reshape(shape)
        if dt == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            arr = arr.astype(np.float32)
        out[name] = np.array(arr)  # own the memory, native byte order
    return out, meta


def _to_bf16_bits(a):
    # Round to nearest even, as the C++ side is expected to; NaN stays NaN.
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    rounded[nan] = 0x7FC0
    return rounded


def write_safetensors(path, tensors, metadata=None, dtype="F32"):
    """Writes name -> array (torch or numpy). Floats go out as `dtype`
    (F32, F16 or BF16), integer arrays as I32. Atomic: temp file then os.replace."""
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        a = np.asarray(t)
        if np.issubdtype(a.dtype, np.integer):
            raw = np.ascontiguousarray(a, dtype="<i4").tobytes()
            dt = "I32"
        elif dtype == "F32":
            raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
            dt = "F32"
        elif dtype == "F16":
            raw = np.ascontiguousarray(a, dtype="<f2").tobytes()
            dt = "F16"
        elif dtype == "BF16":
            raw = _to_bf16_bits(a).astype("<u2").tobytes()
            dt = "BF16"
        else:
            raise ReferenceError(f"unsupported output dtype {dtype}")
        header[name] = {"dtype": dt, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)  # keeps the data buffer 8-byte aligned
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hj)))
            f.write(hj)
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------
# configuration and parameters
# ----------------------------------------------------------------------------

def parse_structure(text, n_layers, retentions, where):
    """Parses a layout such as "TT(TT(T)T)T" into a tree.

    Returns (root_items, num_subsamplers, retentions, closing_rank). An item is
    ("T", block_index) or ("S", j, child_items); blocks are numbered by their 'T' across
    the whole string, subsamplers by their '('. Subsampler j owns decoder.downsamplers.j
    and the bypass after its matching ')', whose rank among the ')' is closing_rank[j]."""
    root = []
    stack = [root]
    open_ids = []
    closing_rank = {}
    n_blocks = n_sub = 0
    for pos, ch in enumerate(text):
        if ch == "T":
            stack[-1].append(("T", n_blocks))
            n_blocks += 1
        elif ch == "(":
            child = []
            stack[-1].append(("S", n_sub, child))
            stack.append(child)
            open_ids.append(n_sub)
            n_sub += 1
        elif ch == ")":
            if len(stack) == 1:
                raise ReferenceError(f"{where}: structure {text!r}: unmatched ')' at {pos}")
            if not stack[-1]:
                raise ReferenceError(f"{where}: structure {text!r}: empty segment at {pos}")
            stack.pop()
            closing_rank[open_ids.pop()] = len(closing_rank)
        else:
            raise ReferenceError(f"{where}: structure {text!r}: unexpected {ch!r} at {pos}")
    if len(stack) != 1:
        raise ReferenceError(f"{where}: structure {text!r}: unclosed '('")
    if n_blocks != n_layers:
        raise ReferenceError(f"{where}: structure has {n_blocks} blocks, "
                             f"decoder_layers is {n_layers}")
    if n_sub:
        if not retentions:
            raise ReferenceError(f"{where}: structure {text!r} has subsamplers but no "
                                 "downsampling_factor_denominator")
        if len(retentions) == 1:
            retentions = retentions * n_sub
        if len(retentions) != n_sub:
            raise ReferenceError(f"{where}: downsampling_factor_denominator has "
                                 f"{len(retentions)} values for {n_sub} subsamplers")
        for r in retentions:
            if not (0.0 < r <= 1.0):
                raise ReferenceError(f"{where}: retention {r} outside (0, 1]")
    return root, n_sub, (list(retentions) if n_sub else []), [closing_rank[j] for j in range(n_sub)]


def parse_retentions(raw, where):
    """downsampling_factor_denominator: number, "0.6", "0.6,0.5" or a JSON list."""
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else (raw.split(",") if isinstance(raw, str)
                                              else [raw])
    out = []
    for it in items:
        try:
            v = float(it.strip() if isinstance(it, str) else it)
        except (TypeError, ValueError):
            raise ReferenceError(f"{where}: bad downsampling_factor_denominator {raw!r}")
        if not math.isfinite(v):
            raise ReferenceError(f"{where}: bad downsampling_factor_denominator {raw!r}")
        out.append(v)
    return out


def load_config(path):
    if not os.path.isfile(path):
        raise ReferenceError(f"missing file: {path}")
    with open(path) as f:
        raw = json.load(f)
    cfg = {}
    for key in ("num_embeddings", "decoder_embed_dim", "decoder_ffn_embed_dim",
                "decoder_layers", "decoder_attention_heads"):
        if key not in raw:
            raise ReferenceError(f"{path}: missing required key {key!r}")
        cfg[key] = int(raw[key])
    cfg["tie_weights"] = bool(raw.get("tie_weights", False))
    # A missing qk_bias means true (the authors' class), false in files of subllm (its own keys).
    ours = any(k in raw for k in ("norm_eps", "rope_base", "subllm_format"))
    cfg["qk_bias"] = bool(raw.get("qk_bias", not ours))
    cfg["padding_idx"] = int(raw.get("padding_idx", 0))
    cfg["norm_eps"] = float(raw.get("norm_eps", 1e-5))
    cfg["rope_base"] = float(raw.get("rope_base", 10000.0))
    structure = raw.get("structure") or "T" * cfg["decoder_layers"]
    if not isinstance(structure, str):
        raise ReferenceError(f"{path}: structure must be a string")
    rets = parse_retentions(raw.get("downsampling_factor_denominator"), path)
    if raw.get("downsampling_factor") is not None:
        # The authors' per-subsampler factors 1/r override the one denominator.
        factors = raw["downsampling_factor"]
        rets = [1.0 / float(f) for f in (factors if isinstance(factors, list) else [factors])]
    cfg["structure"] = structure
    cfg["segments"], cfg["num_subsamplers"], cfg["retentions"], closing = parse_structure(
        structure, cfg["decoder_layers"], rets, path)
    old_numbering = raw.get("subllm_format") == 1
    # RoPE positions inside nested segments: "parent" (the authors' rule) = a kept token's
    # row index within its parent segment; "original" = its position in the full sequence.
    # Without the key: "original" for a config recognisably subllm's (written before the key
    # existed), "parent" otherwise.
    ours = any(k in raw for k in ("subllm_format", "norm_eps", "rope_base"))
    rule = raw.get("rope_positions") or ("original" if ours else "parent")
    if rule not in ("parent", "original"):
        raise ReferenceError(f"{path}: rope_positions {rule!r}: expected 'parent' or 'original'")
    cfg["rope_parent_positions"] = rule == "parent"
    cfg["bypass_index"] = list(range(len(closing))) if old_numbering else closing
    d, h = cfg["decoder_embed_dim"], cfg["decoder_attention_heads"]
    if h <= 0 or d % h != 0:
        raise ReferenceError(f"{path}: decoder_embed_dim {d} not divisible by heads {h}")
    # Grouped-query attention: key/value heads, each shared by h / kv query heads.
    kv = raw.get("decoder_kv_heads")
    cfg["kv_heads"] = h if kv is None else int(kv)
    if cfg["kv_heads"] <= 0 or h % cfg["kv_heads"] != 0:
        raise ReferenceError(f"{path}: decoder_kv_heads {kv} does not divide heads {h}")
    if (d // h) % 2 != 0:
        raise ReferenceError(f"{path}: head_dim {d // h} must be even for rotate-half RoPE")
    return cfg


def score_name(j):
    return f"decoder.downsamplers.{j}.to_scores.weight"


def bypass_name(cfg, j):
    """The bypass of subsampler j (its '(' rank), by the file's numbering."""
    return f"decoder.bypasses.{cfg['bypass_index'][j]}.bypass_scale"


def param_shapes(cfg):
    """Ordered name -> shape, in checkpoint naming."""
    V, d, F, L = (cfg["num_embeddings"], cfg["decoder_embed_dim"],
                  cfg["decoder_ffn_embed_dim"], cfg["decoder_layers"])
    shapes = {"decoder.embed_tokens.weight": (V, d)}
    for i in range(L):
        p = f"decoder.layers.{i}."
        shapes[p + "self_attn_layer_norm.weight"] = (d,)
        kvd = d // cfg["decoder_attention_heads"] * cfg.get("kv_heads", cfg["decoder_attention_heads"])
        for proj, rows in (("q_proj", d), ("k_proj", kvd), ("v_proj", kvd), ("out_proj", d)):
            shapes[p + f"self_attn.{proj}.weight"] = (rows, d)
        if cfg.get("qk_bias", False):
            shapes[p + "self_attn.q_proj.bias"] = (d,)
            shapes[p + "self_attn.k_proj.bias"] = (kvd,)
        shapes[p + "final_layer_norm.weight"] = (d,)
        shapes[p + "feedforward.swiglu.w12.weight"] = (2 * F, d)
        shapes[p + "feedforward.swiglu.w3.weight"] = (d, F)
    for j in range(cfg.get("num_subsamplers", 0)):
        shapes[score_name(j)] = (1, d)
        shapes[bypass_name(cfg, j)] = (d,)
    shapes["decoder.layer_norm.weight"] = (d,)
    if not cfg["tie_weights"]:
        shapes["decoder.output_projection.weight"] = (V, d)
    return shapes


def load_params(path, cfg, dtype):
    arrays, _ = read_safetensors(path)
    shapes = param_shapes(cfg)
    params = {}
    for name, shape in shapes.items():
        if name not in arrays:
            raise ReferenceError(f"{path}: missing tensor {name!r}")
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            raise ReferenceError(f"{path}: tensor {name!r} has shape {list(a.shape)}, "
                                 f"expected {list(shape)}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ReferenceError(f"{path}: tensor {name!r} is not floating point")
        params[name] = torch.tensor(a, dtype=dtype)
    for extra in sorted(set(arrays) - set(shapes)):
        print(f"reference.py: warning: ignoring unexpected tensor {extra!r} in {path}",
              file=sys.stderr)
    return params


def load_batch(path, cfg):
    arrays, _ = read_safetensors(path)
    for key in ("tokens", "targets"):
        if key not in arrays:
            raise ReferenceError(f"{path}: missing tensor {key!r}")
    tokens, targets = arrays["tokens"], arrays["targets"]
    if tokens.ndim != 2:
        raise ReferenceError(f"{path}: tokens must be (B,T), got shape {list(tokens.shape)}")
    if targets.shape != tokens.shape:
        raise ReferenceError(f"{path}: targets shape {list(targets.shape)} != "
                             f"tokens shape {list(tokens.shape)}")
    for key in ("tokens", "targets", "positions"):
        if key in arrays and not np.issubdtype(arrays[key].dtype, np.integer):
            raise ReferenceError(f"{path}: tensor {key!r} must be integer")
    V = cfg["num_embeddings"]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
        raise ReferenceError(f"{path}: tokens outside [0, {V})")
    if targets.size and targets.max() >= V:
        raise ReferenceError(f"{path}: targets >= vocabulary size {V}")
    B, T = tokens.shape
    if "positions" in arrays:
        positions = arrays["positions"]
        if positions.shape != tokens.shape:
            raise ReferenceError(f"{path}: positions shape {list(positions.shape)} != "
                                 f"tokens shape {list(tokens.shape)}")
    else:
        positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    return (torch.tensor(tokens.astype(np.int64)),
            torch.tensor(targets.astype(np.int64)),
            torch.tensor(np.array(positions, dtype=np.int64)))


def load_train_choices(path, cfg):
    """Optional `step` (I32 [1]) and `choices/j` (I32 [3]: flipped, balancer_on,
    limit_on) of batch.safetensors. Returns (step, [(flipped, bal, lim)] per subsampler)."""
    arrays, _ = read_safetensors(path)
    step = 0
    if "step" in arrays:
        a = arrays["step"]
        if not np.issubdtype(a.dtype, np.integer) or a.size != 1:
            raise ReferenceError(f"{path}: step must be one integer, got {a.dtype} "
                                 f"{list(a.shape)}")
        step = int(a.reshape(-1)[0])
    n = cfg["num_subsamplers"]
    choices = [(False, False, False)] * n
    for key, a in arrays.items():
        if not key.startswith("choices/"):
            continue
        try:
            j = int(key[len("choices/"):])
        except ValueError:
            raise ReferenceError(f"{path}: bad tensor name {key!r}")
        if not 0 <= j < n:
            raise ReferenceError(f"{path}: {key!r} but the model has {n} subsamplers")
        if not np.issubdtype(a.dtype, np.integer) or a.shape != (3,):
            raise ReferenceError(f"{path}: {key!r} must be an integer [3], got {a.dtype} "
                                 f"{list(a.shape)}")
        choices[j] = tuple(bool(v != 0) for v in a)
    return step, choices


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_tables(positions, head_dim, base, dtype):
    """cos/sin of shape (B, T, head_dim/2) for explicit integer positions.
    Angles are formed in float64 so float32 runs see correctly rounded tables."""
    half = head_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    inv_freq = base ** (-2.0 * i / head_dim)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos/sin: (B, T, hd/2). Pairs (i, i + hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def block(params, cfg, i, x, cos, sin, causal):
    """Transformer block i on x (B, N, d); cos/sin from the tokens' positions; causal
    (N, N) by sequence index within x."""
    d, H = cfg["decoder_embed_dim"], cfg["decoder_attention_heads"]
    F = cfg["decoder_ffn_embed_dim"]
    eps = cfg["norm_eps"]
    hd = d // H
    B, N = x.shape[0], x.shape[1]

    Hkv = cfg.get("kv_heads", H)

    def heads(t):  # (B, N, n*hd) -> (B, n, N, hd), contiguous feature groups per head
        return t.view(B, N, t.shape[-1] // hd, hd).transpose(1, 2)

    def shared(t):  # (B, Hkv, N, hd) -> (B, H, N, hd): query head j reads key/value head j // (H / Hkv)
        return t.repeat_interleave(H // Hkv, dim=1)

    p = f"decoder.layers.{i}."
    n1 = rms_norm(x, params[p + "self_attn_layer_norm.weight"], eps)
    q = n1 @ params[p + "self_attn.q_proj.weight"].t()
    k = n1 @ params[p + "self_attn.k_proj.weight"].t()
    if cfg.get("qk_bias", False):
        q = q + params[p + "self_attn.q_proj.bias"]
        k = k + params[p + "self_attn.k_proj.bias"]
    q, k = heads(q), heads(k)
    v = heads(n1 @ params[p + "self_attn.v_proj.weight"].t())
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = shared(k), shared(v)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if causal.dim() == 2:
        causal = causal.unsqueeze(0)
    allowed = causal.unsqueeze(1)  # (1 or B, 1, N, N)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A query with every key masked (only with mask_padding) attends to nothing.
    att = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v
    att = att.transpose(1, 2).reshape(B, N, d)
    h = x + att @ params[p + "self_attn.out_proj.weight"].t()
    n2 = rms_norm(h, params[p + "final_layer_norm.weight"], eps)
    gu = n2 @ params[p + "feedforward.swiglu.w12.weight"].t()
    g, u = gu[..., :F], gu[..., F:]
    return h + (torch.nn.functional.silu(g) * u) @ params[p + "feedforward.swiglu.w3.weight"].t()


# --- training machinery (SUBLLM.md section 7) --------------------------------

BALANCER_GRAD_SCALE = 0.04
BALANCER_POS_MARGIN = 0.05          # positive fraction kept in [r - 0.05, r + 0.05]
BALANCER_RMS_MIN = 1.25331413732 * 1.0
BALANCER_RMS_MAX = 1.25331413732 * 4.0
BYPASS_MAX = 1.0
BYPASS_MIN_POINTS = ((0.0, 0.9), (20000.0, 0.2))
SCORE_LR_SCALE = 0.5


def scheduled_float(points, step):
    """Piecewise-linear in the step through `points`, constant outside them."""
    step = float(step)
    if step <= points[0][0]:
        return float(points[0][1])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if step <= x1:
            return float(y0 + (y1 - y0) * (step - x0) / (x1 - x0))
    return float(points[-1][1])


def _atanh(x):
    return 0.5 * (math.log(1.0 + x + 1e-10) - math.log(1.0 - x + 1e-10))


def balancer_mean_bounds(r):
    """(m_min, m_max) from the positive-fraction bounds r -/+ 0.05 (clamped into [0, 1],
    so a retention above 0.95 does not take the log of a negative number)."""
    p_min = min(max(r - BALANCER_POS_MARGIN, 0.0), 1.0)
    p_max = min(max(r + BALANCER_POS_MARGIN, 0.0), 1.0)
    return (0.8139535143 * _atanh(2.0 * p_min - 1.0),
            0.8139535143 * _atanh(2.0 * p_max - 1.0))


def balancer_loss(x, m_min, m_max, rho_min, rho_max):
    """The balancer's loss with all elements of x as one channel."""
    mu = x.mean()
    uv = (x * x).mean()
    sigma = torch.sqrt(torch.clamp(uv - mu * mu, min=1e-20))
    rho = torch.sqrt(torch.clamp(uv, min=1e-20))
    m = mu / sigma
    return ((m - torch.clamp(m, m_min, m_max)).abs()
            + torch.log(torch.clamp(rho, rho_min, rho_max) / rho).abs())


class ScoreBalancer(torch.autograd.Function):
    """Identity forward; backward x_grad + |x_grad| * g, g = d(balancer loss)/dx
    rescaled to RMS grad_scale."""

    @staticmethod
    def forward(ctx, x, m_min, m_max, rho_min, rho_max, grad_scale):
        ctx.save_for_backward(x)
        ctx.consts = (m_min, m_max, rho_min, rho_max, grad_scale)
        return x.clone()

    @staticmethod
    def backward(ctx, x_grad):
        (x,) = ctx.saved_tensors
        m_min, m_max, rho_min, rho_max, grad_scale = ctx.consts
        with torch.enable_grad():
            xd = x.detach().clone().requires_grad_(True)
            loss = balancer_loss(xd, m_min, m_max, rho_min, rho_max)
            (g,) = torch.autograd.grad(loss, xd)
        rms = float(torch.sqrt((g * g).mean()))
        g = g * (grad_scale / max(rms, 1e-20))
        return x_grad + x_grad.abs() * g, None, None, None, None, None


class LimitParamGrad(torch.autograd.Function):
    """Identity forward; backward flips the gradient where a descent step would push
    the parameter further below c_min or above c_max."""

    @staticmethod
    def forward(ctx, c, c_min, c_max):
        ctx.save_for_backward(c)
        ctx.consts = (c_min, c_max)
        return c.clone()

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        c_min, c_max = ctx.consts
        grad = torch.where((grad > 0) & (c < c_min), -grad, grad)
        grad = torch.where((grad < 0) & (c > c_max), -grad, grad)
        return grad, None, None


def kept_count(tp, r):
    return max(1, int(math.ceil(tp * r - 1e-6)))


def subsample(params, cfg, j, x, flipped, balancer_on, trace):
    """Subsampler j (training mode) on x (B, Tp, d). Returns (kept (B, Tc) ascending
    indices into the parent, w_scale (B, Tc) in that order)."""
    B, Tp, d = x.shape
    r = cfg["retentions"][j]
    Tc = kept_count(Tp, r)
    s_raw = (x @ params[score_name(j)].t()).squeeze(-1)  # (B, Tp)
    s = s_raw
    if balancer_on:
        m_min, m_max = balancer_mean_bounds(r)
        s = ScoreBalancer.apply(s_raw, m_min, m_max, BALANCER_RMS_MIN, BALANCER_RMS_MAX,
                                BALANCER_GRAD_SCALE)
    if trace is not None:
        trace[f"input/{j}"] = x
        for key, t in ((f"scores_raw/{j}", s_raw), (f"scores/{j}", s)):
            if t.requires_grad:
                t.retain_grad()
            trace[key] = t
    weights = torch.clamp(s, 0.0, 1.0)
    order = torch.sort(s.detach(), dim=1, descending=True, stable=True).indices
    w_sorted = weights.gather(1, order)
    w_kept = w_sorted[:, :Tc]
    w_disc = w_sorted[:, Tc:2 * Tc]
    if w_disc.shape[1] < Tc:
        w_disc = torch.cat([w_disc, w_disc.new_zeros(B, Tc - w_disc.shape[1])], dim=1)
    if flipped:
        w_disc = w_disc.flip(1)
    w_scale_rank = w_kept - w_disc
    kept, perm = torch.sort(order[:, :Tc], dim=1)
    w_scale = w_scale_rank.gather(1, perm)
    return kept, w_scale


def run_segment(params, cfg, items, x, positions, step, choices, trace, record, key_mask=None,
                depth=0):
    """Runs the items of one segment on x (B, N, d) whose tokens sit at RoPE `positions`
    (B, N). key_mask (B, N), True where a key is masked, applies to this segment's blocks
    only: the authors drop it inside subsampled segments. A child segment's positions: with
    "original", the kept tokens' positions here; with "parent", their row indices here,
    except below the root, whose (possibly explicit) positions the first level keeps."""
    hd = cfg["decoder_embed_dim"] // cfg["decoder_attention_heads"]
    N = x.shape[1]
    cos = sin = causal = None
    for item in items:
        if item[0] == "T":
            if cos is None:
                cos, sin = rope_tables(positions, hd, cfg["rope_base"], x.dtype)
                # Causality is by sequence index, independent of the RoPE positions.
                causal = torch.ones(N, N, dtype=torch.bool).tril()
                if key_mask is not None:
                    causal = causal.unsqueeze(0) & ~key_mask.unsqueeze(1)
            x = block(params, cfg, item[1], x, cos, sin, causal)
            continue
        _, j, child = item
        flipped, balancer_on, limit_on = choices[j]
        B, Tp, d = x.shape
        kept, w_scale = subsample(params, cfg, j, x, flipped, balancer_on, trace)
        record[f"kept/{j}"] = kept
        record[f"w_scale/{j}"] = w_scale.detach()
        idx = kept.unsqueeze(-1).expand(B, kept.shape[1], d)
        xk = x.gather(1, idx)
        by_row = cfg.get("rope_parent_positions", False) and depth > 0
        child_pos = kept if by_row else positions.gather(1, kept)
        yk = run_segment(params, cfg, child, xk, child_pos, step, choices, trace, record,
                         depth=depth + 1)
        ws = w_scale.unsqueeze(-1)
        u = x.scatter(1, idx, ws * yk + (1.0 - ws) * xk)
        c = params[bypass_name(cfg, j)]
        if limit_on:
            c = LimitParamGrad.apply(c, scheduled_float(BYPASS_MIN_POINTS, step), BYPASS_MAX)
        x = x + c * (u - x)
    return x


def forward(params, cfg, tokens, positions, step=0, choices=None, trace=None, record=None,
            mask_padding=False):
    """Returns logits (B, T, V). `choices[j]` = (flipped, balancer_on, limit_on) of
    subsampler j (default all off); `record` (a dict) receives kept/j and w_scale/j;
    `trace` (a dict) receives input/j, scores_raw/j and scores/j (gradients retained)."""
    eps = cfg["norm_eps"]
    n_sub = cfg.get("num_subsamplers", 0)
    if choices is None:
        choices = [(False, False, False)] * n_sub
    if record is None:
        record = {}
    segments = cfg.get("segments")
    if segments is None:
        segments = [("T", i) for i in range(cfg["decoder_layers"])]
    emb = params["decoder.embed_tokens.weight"]
    x = emb[tokens]
    key_mask = tokens.eq(cfg["padding_idx"]) if mask_padding else None
    x = run_segment(params, cfg, segments, x, positions, step, choices, trace, record, key_mask)
    x = rms_norm(x, params["decoder.layer_norm.weight"], eps)
    w_out = emb if cfg["tie_weights"] else params["decoder.output_projection.weight"]
    return x @ w_out.t()


def loss_fn(logits, targets):
    """Mean cross-entropy over targets >= 0. With no valid target the loss is 0
    (and every gradient 0) rather than NaN."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    tgt = targets.reshape(-1)
    valid = tgt >= 0
    logp = torch.log_softmax(flat, dim=-1)
    picked = logp.gather(1, tgt.clamp(min=0).unsqueeze(1)).squeeze(1)
    nll = -(picked * valid.to(logp.dtype)).sum()
    count = int(valid.sum())
    return nll / max(count, 1)


# ----------------------------------------------------------------------------
# optimizer
# ----------------------------------------------------------------------------

def load_optim(path):
    with open(path) as f:
        raw = json.load(f)
    if "lr" not in raw:
        raise ReferenceError(f"{path}: missing required key 'lr'")
    # Missing keys fall back to torch.optim.AdamW defaults.
    return {"lr": float(raw["lr"]),
            "beta1": float(raw.get("beta1", 0.9)),
            "beta2": float(raw.get("beta2", 0.999)),
            "eps": float(raw.get("eps", 1e-8)),
            "weight_decay": float(raw.get("weight_decay", 0.01)),
            "grad_clip": float(raw.get("grad_clip", 0.0) or 0.0)}


def global_norm(grads):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))


def is_subsampler_param(name):
    return name.startswith("decoder.downsamplers.") or name.startswith("decoder.bypasses.")


def param_lr_scale(name):
    return SCORE_LR_SCALE if name.startswith("decoder.downsamplers.") else 1.0


def param_decays(name, ndim):
    return ndim >= 2 and not is_subsampler_param(name)


def adamw_first_step(params, grads, opt, total_norm):
    """One AdamW step from zero moments (step = 1), with clip_grad_norm_ semantics:
    scale = min(1, max_norm / (norm + 1e-6)). Weight decay only for ndim >= 2 and not
    for to_scores / bypass_scale; to_scores runs at lr x 0.5."""
    lr, b1, b2, eps, wd = opt["lr"], opt["beta1"], opt["beta2"], opt["eps"], opt["weight_decay"]
    scale = 1.0
    if opt["grad_clip"] > 0:
        scale = min(1.0, opt["grad_clip"] / (float(total_norm) + 1e-6))
    bc1 = 1.0 - b1
    bc2 = 1.0 - b2
    out = {}
    for name, p in params.items():
        g = grads[name] * scale
        m = (1.0 - b1) * g
        v = (1.0 - b2) * g * g
        q = p.detach().clone()
        lr_p = lr * param_lr_scale(name)
        if param_decays(name, p.ndim):
            q = q * (1.0 - lr_p * wd)
        q = q - (lr_p / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
        out[name] = q
    return out


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------

def run(directory, dtype):
    cfg = load_config(os.path.join(directory, "config.json"))
    params = load_params(os.path.join(directory, "model.safetensors"), cfg, dtype)
    batch_path = os.path.join(directory, "batch.safetensors")
    tokens, targets, positions = load_batch(batch_path, cfg)
    step, choices = load_train_choices(batch_path, cfg)
    mask_padding = bool(read_safetensors(batch_path)[0].get("mask_padding", np.zeros(1)).reshape(-1)[0])
    optim_path = os.path.join(directory, "optim.json")
    opt = load_optim(optim_path) if os.path.isfile(optim_path) else None

    for p in params.values():
        p.requires_grad_(True)
    record = {}
    logits = forward(params, cfg, tokens, positions, step=step, choices=choices, record=record,
                     mask_padding=mask_padding)
    loss = loss_fn(logits, targets)
    names = list(params)
    grad_list = torch.autograd.grad(loss, [params[n] for n in names])
    grads = {n: g.detach() for n, g in zip(names, grad_list)}
    norm = global_norm(grads)

    out = {"loss": loss.detach().reshape(1),
           "logits": logits.detach(),
           "grad_norm": norm.reshape(1)}
    for n in names:
        out["grad/" + n] = grads[n]
    out.update(record)  # kept/j (I32), w_scale/j
    if opt is not None:
        updated = adamw_first_step({n: params[n].detach() for n in names}, grads, opt, norm)
        for n in names:
            out["updated/" + n] = updated[n]
    meta = {"dtype": str(dtype).replace("torch.", ""), "torch_version": torch.__version__}
    write_safetensors(os.path.join(directory, "reference.safetensors"), out, meta)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = ap.parse_args(argv)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    # Deterministic, single-process numerics regardless of the caller's environment.
    torch.use_deterministic_algorithms(True)
    try:
        out = run(args.dir, dtype)
    except ReferenceError as e:
        print(f"reference.py: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"reference.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"reference.py: loss {float(out['loss'][0]):.9g} grad_norm "
          f"{float(out['grad_norm'][0]):.9g} -> {os.path.join(args.dir, 'reference.safetensors')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
