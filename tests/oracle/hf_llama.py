#!/usr/bin/python3
"""A Hugging Face LLaMA for the converter's tests, written from the documented semantics of
transformers' LlamaForCausalLM (not from its code):

  h = embed_tokens[ids]
  per layer:  h = h + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = input_layernorm(h)
              h = h + down_proj(silu(gate_proj(n)) * up_proj(n)),                       n = post_attention_layernorm(h)
  logits = lm_head(norm(h))      (lm_head = embed_tokens when tie_word_embeddings)

RMSNorm(x) = weight * x / sqrt(mean(x^2) + rms_norm_eps). Attention is causal, scaled by
1/sqrt(head_dim); with num_key_value_heads < num_attention_heads each key/value head serves
num_attention_heads / num_key_value_heads consecutive query heads ("repeat_kv"). RoPE rotates
halves ("rotate_half"): channel i pairs with i + head_dim/2, angle pos * rope_theta^(-2i/head_dim).

Commands (safetensors written and read here by hand: the format is a u64 header length, a JSON
header, then raw little-endian data):
  make DIR --seed S --dtype f32|bf16 --shards N [--vocab V] [--kv K] [--tie] [--bias] [--rope-scaling] [--act gelu]
      writes config.json and the weights (model.safetensors, or N shards and the index) into DIR
      (tokenizer.model is the test's);
  logits DIR TOKENS_JSON OUT_F32     logits (T, V) of the token ids in float64, stored as float32
  same A B                           exit 0 when folders A and B hold the same tensors bit for bit
"""
import json
import math
import os
import struct
import sys

import torch

DTYPES = {"F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2)}


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        dt = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype]
        # Raw bytes through a same-size integer view (bf16 has no numpy type).
        raw = t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes()
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    """name -> (dtype name, shape, raw bytes)"""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        out[name] = (e["dtype"], tuple(e["shape"]), data[8 + n + a:8 + n + b])
    return out


def read_folder(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(read_safetensors(os.path.join(d, f)))
    return out


def to_tensor(entry):
    dt, shape, raw = entry
    torch_dt, size = DTYPES[dt]
    ints = torch.frombuffer(bytearray(raw), dtype=torch.int16 if size == 2 else torch.int32)
    return ints.view(torch_dt).reshape(shape).to(torch.float64)


def make(d, seed, dtype, shards, kv, tie, bias, rope_scaling, act, V):
    g = torch.Generator().manual_seed(seed)
    D, F, L, H = 32, 40, 3, 4
    kv = kv or H
    hd = D // H
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": kv,
           "hidden_act": act, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 500.0,
           "rope_scaling": {"type": "linear", "factor": 2.0} if rope_scaling else None,
           "attention_bias": bias, "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32

    def rnd(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    t = {"model.embed_tokens.weight": rnd(V, D, scale=1.0)}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + rnd(D, scale=0.1).double()).to(dt)
        t[p + "self_attn.q_proj.weight"] = rnd(D, D)
        t[p + "self_attn.k_proj.weight"] = rnd(kv * hd, D)
        t[p + "self_attn.v_proj.weight"] = rnd(kv * hd, D)
        t[p + "self_attn.o_proj.weight"] = rnd(D, D)
        if bias:
            t[p + "self_attn.q_proj.bias"] = rnd(D)
        t[p + "post_attention_layernorm.weight"] = (1 + rnd(D, scale=0.1).double()).to(dt)
        t[p + "mlp.gate_proj.weight"] = rnd(F, D)
        t[p + "mlp.up_proj.weight"] = rnd(F, D)
        t[p + "mlp.down_proj.weight"] = rnd(D, F)
    t["model.norm.weight"] = (1 + rnd(D, scale=0.1).double()).to(dt)
    if not tie:
        t["lm_head.weight"] = rnd(V, D)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if shards <= 1:
        write_safetensors(os.path.join(d, "model.safetensors"), t)
        return
    names = list(t)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t[n] for n in names[s::shards]}
        write_safetensors(os.path.join(d, fname), part)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)


def rms_norm(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def logits(d, ids):
    cfg = json.load(open(os.path.join(d, "config.json")))
    W = {n: to_tensor(e) for n, e in read_folder(d).items()}
    H, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg["hidden_size"]
    hd = D // H
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)
    pos = torch.arange(T, dtype=torch.float64)
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(pos, inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1)  # (T, hd)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    h = W["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        n = rms_norm(h, W[p + "input_layernorm.weight"], eps)
        q = (n @ W[p + "self_attn.q_proj.weight"].T).view(T, H, hd).transpose(0, 1)
        k = (n @ W[p + "self_attn.k_proj.weight"].T).view(T, kv, hd).transpose(0, 1)
        v = (n @ W[p + "self_attn.v_proj.weight"].T).view(T, kv, hd).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(H // kv, dim=0)
        v = v.repeat_interleave(H // kv, dim=0)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        s = s.masked_fill(~mask, float("-inf"))
        a = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(T, D)
        h = h + a @ W[p + "self_attn.o_proj.weight"].T
        n = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
        m = torch.nn.functional.silu(n @ W[p + "mlp.gate_proj.weight"].T) * (n @ W[p + "mlp.up_proj.weight"].T)
        h = h + m @ W[p + "mlp.down_proj.weight"].T
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    return rms_norm(h, W["model.norm.weight"], eps) @ head.T


def main():
    cmd = sys.argv[1]
    if cmd == "make":
        args = sys.argv[3:]
        opt = lambda k, d: args[args.index(k) + 1] if k in args else d  # noqa: E731
        make(sys.argv[2], int(opt("--seed", "1")), opt("--dtype", "f32"), int(opt("--shards", "1")),
             int(opt("--kv", "0")), "--tie" in args, "--bias" in args, "--rope-scaling" in args, opt("--act", "silu"),
             int(opt("--vocab", "400")))
    elif cmd == "logits":
        ids = json.load(open(sys.argv[3]))
        out = logits(sys.argv[2], ids).to(torch.float32).contiguous()
        with open(sys.argv[4], "wb") as f:
            f.write(out.numpy().tobytes())
    elif cmd == "same":
        a, b = read_folder(sys.argv[2]), read_folder(sys.argv[3])
        if set(a) != set(b):
            print("tensor names differ:", sorted(set(a) ^ set(b)))
            sys.exit(1)
        for n in a:
            if a[n] != b[n]:
                print("tensor differs:", n, a[n][0], b[n][0], a[n][1], b[n][1])
                sys.exit(1)
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
