#!/usr/bin/env python3
"""PyTorch reference (oracle) for one LLaMA training step of subllm.

Usage: /usr/bin/python3 tests/oracle/reference.py DIR [--dtype float64|float32]

Inputs in DIR:
  config.json          model description (SUBLLM.md section 2 key names)
  model.safetensors    parameters, named as in the public checkpoints
  batch.safetensors    tokens (B,T) int, targets (B,T) int (negative = ignored),
                       optional positions (B,T) int (default 0..T-1 per row)
  optim.json           optional {"lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"}

Output DIR/reference.safetensors (all F32):
  loss [1], logits (B,T,V), grad_norm [1] (global L2 norm before clipping),
  grad/<name> for every parameter, and with optim.json updated/<name> after
  one AdamW step (torch.optim.AdamW semantics, decay only on ndim >= 2).
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
    cfg["norm_eps"] = float(raw.get("norm_eps", 1e-6))
    cfg["rope_base"] = float(raw.get("rope_base", 10000.0))
    structure = raw.get("structure")
    if structure is not None and set(structure) - {"T"}:
        raise ReferenceError(f"{path}: structure {structure!r} has subsamplers; "
                             "this reference covers plain LLaMA ('T' only)")
    if structure is not None and len(structure) != cfg["decoder_layers"]:
        raise ReferenceError(f"{path}: structure has {len(structure)} blocks, "
                             f"decoder_layers is {cfg['decoder_layers']}")
    d, h = cfg["decoder_embed_dim"], cfg["decoder_attention_heads"]
    if h <= 0 or d % h != 0:
        raise ReferenceError(f"{path}: decoder_embed_dim {d} not divisible by heads {h}")
    if (d // h) % 2 != 0:
        raise ReferenceError(f"{path}: head_dim {d // h} must be even for rotate-half RoPE")
    return cfg


def param_shapes(cfg):
    """Ordered name -> shape, in checkpoint naming."""
    V, d, F, L = (cfg["num_embeddings"], cfg["decoder_embed_dim"],
                  cfg["decoder_ffn_embed_dim"], cfg["decoder_layers"])
    shapes = {"decoder.embed_tokens.weight": (V, d)}
    for i in range(L):
        p = f"decoder.layers.{i}."
        shapes[p + "self_attn_layer_norm.weight"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (d, d)
        shapes[p + "final_layer_norm.weight"] = (d,)
        shapes[p + "feedforward.swiglu.w12.weight"] = (2 * F, d)
        shapes[p + "feedforward.swiglu.w3.weight"] = (d, F)
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


def forward(params, cfg, tokens, positions):
    """Returns logits (B, T, V)."""
    d, H, L = cfg["decoder_embed_dim"], cfg["decoder_attention_heads"], cfg["decoder_layers"]
    F = cfg["decoder_ffn_embed_dim"]
    eps = cfg["norm_eps"]
    hd = d // H
    B, T = tokens.shape
    emb = params["decoder.embed_tokens.weight"]
    x = emb[tokens]
    cos, sin = rope_tables(positions, hd, cfg["rope_base"], x.dtype)
    # Causality is by sequence index, independent of the RoPE positions.
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def heads(t):  # (B, T, d) -> (B, H, T, hd), contiguous feature groups per head
        return t.view(B, T, H, hd).transpose(1, 2)

    for i in range(L):
        p = f"decoder.layers.{i}."
        n1 = rms_norm(x, params[p + "self_attn_layer_norm.weight"], eps)
        q = heads(n1 @ params[p + "self_attn.q_proj.weight"].t())
        k = heads(n1 @ params[p + "self_attn.k_proj.weight"].t())
        v = heads(n1 @ params[p + "self_attn.v_proj.weight"].t())
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, T, d)
        h = x + att @ params[p + "self_attn.out_proj.weight"].t()
        n2 = rms_norm(h, params[p + "final_layer_norm.weight"], eps)
        gu = n2 @ params[p + "feedforward.swiglu.w12.weight"].t()
        g, u = gu[..., :F], gu[..., F:]
        x = h + (torch.nn.functional.silu(g) * u) @ params[p + "feedforward.swiglu.w3.weight"].t()
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


def adamw_first_step(params, grads, opt, total_norm):
    """One AdamW step from zero moments (step = 1), with clip_grad_norm_ semantics:
    scale = min(1, max_norm / (norm + 1e-6))."""
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
        if p.ndim >= 2:
            q = q * (1.0 - lr * wd)
        q = q - (lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
        out[name] = q
    return out


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------

def run(directory, dtype):
    cfg = load_config(os.path.join(directory, "config.json"))
    params = load_params(os.path.join(directory, "model.safetensors"), cfg, dtype)
    tokens, targets, positions = load_batch(os.path.join(directory, "batch.safetensors"), cfg)
    optim_path = os.path.join(directory, "optim.json")
    opt = load_optim(optim_path) if os.path.isfile(optim_path) else None

    for p in params.values():
        p.requires_grad_(True)
    logits = forward(params, cfg, tokens, positions)
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
