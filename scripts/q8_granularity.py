#!/usr/bin/python3
"""Writes a copy of an fp32 model folder whose matrices are rounded as an 8-bit type would
round them, with one scale per group of G weights along a row (G = 32: subllm's q8) or one
per row (G = 0), stored back in fp32, so `subllm eval ppl` on the copy measures what the
scale granularity costs, independently of the kernels.

  /usr/bin/python3 scripts/q8_granularity.py MODEL_DIR OUT_DIR GROUP [--head-bf16]

Rounding as subllm's q8: scale = max|x| / 127 over the group, q = round-half-even(x · (1 / scale)).
Matrices are the 2-D tensors with more than one row (the score layers are vectors); an untied
embedding is only rounded to bf16, as subllm's q8 keeps it; --head-bf16 treats an untied output
head the same way (to measure what its 8 bits cost)."""
import json
import os
import shutil
import struct
import sys

import torch


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, e in header.items():
        assert e["dtype"] == "F32", f"{name}: only fp32 folders ({e['dtype']})"
        b, end = e["data_offsets"]
        tensors[name] = torch.frombuffer(bytearray(data[b:end]), dtype=torch.float32).reshape(e["shape"])
    return tensors, meta


def write_safetensors(path, tensors, meta):
    header, offset, blobs = {"__metadata__": meta}, 0, []
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes() if hasattr(t, "numpy") else bytes(t)
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def fake_q8(w, group):
    rows, cols = w.shape
    g = cols if group == 0 else group
    x = w.reshape(rows, cols // g, g)
    scale = x.abs().amax(dim=2, keepdim=True) / 127.0
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    q = torch.round(x * inv)  # float32 throughout, as the C++ quantizer computes it
    return (q.clamp(-127, 127) * scale).reshape(rows, cols)


def main():
    src, out, group = sys.argv[1], sys.argv[2], int(sys.argv[3])
    head_bf16 = "--head-bf16" in sys.argv[4:]
    if not os.path.exists(os.path.join(src, "model.safetensors")):
        ck = sorted(d for d in os.listdir(src) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
        src = os.path.join(src, ck[-1])
    tensors, meta = read_safetensors(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    tied = cfg.get("tie_weights", False)
    for name, t in tensors.items():
        if t.dim() != 2 or t.shape[0] == 1:
            continue
        if (name == "decoder.embed_tokens.weight" or (head_bf16 and name == "decoder.output_projection.weight")) and not tied:
            tensors[name] = t.to(torch.bfloat16).to(torch.float32)
        else:
            tensors[name] = fake_q8(t, group)
    os.makedirs(out, exist_ok=True)
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(src, f), os.path.join(out, f))
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, meta)


if __name__ == "__main__":
    main()
