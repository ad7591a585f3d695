#!/usr/bin/env python3
"""Distribution of each subsampler's scores of a SUBLLM checkpoint on training windows, as the
balancer sees them in training mode: mean, std, mean/std against the balancer's window, the
counted fraction of positive scores, median and skewness. Uses the PyTorch reference model of
tests/oracle (run with /usr/bin/python3).

Usage: /usr/bin/python3 scripts/score_distribution.py RUN_OR_CHECKPOINT [--data data/default]
       [--windows 8] [--seq 256] [--seed 0]
"""
import argparse
import glob
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "oracle"))
import reference as R  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    ap.add_argument("--data", default="data/default")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ck = a.model
    if not os.path.exists(os.path.join(ck, "model.safetensors")):
        found = sorted(glob.glob(os.path.join(ck, "checkpoint-*")))
        if not found:
            sys.exit(f"error: no model.safetensors or checkpoint-* folder in '{ck}'")
        ck = found[-1]
    cfg = R.load_config(os.path.join(ck, "config.json"))
    if not cfg.get("num_subsamplers"):
        sys.exit(f"error: '{ck}' is a LLaMA (no subsamplers)")
    params = R.load_params(os.path.join(ck, "model.safetensors"), cfg, torch.float32)
    shard = sorted(glob.glob(os.path.join(a.data, "train_*.bin")))
    if not shard:
        sys.exit(f"error: no train_*.bin in '{a.data}': run `subllm prepare` first")
    with open(shard[0], "rb") as f:
        header = f.read(64)
    # Shard header: 8-byte magic, u32 version, u32 dtype (1 = uint16, 2 = uint32), padding.
    dtype = np.uint32 if int.from_bytes(header[12:16], "little") == 2 else np.uint16
    toks = np.fromfile(shard[0], dtype=dtype, offset=64).astype(np.int64)
    rng = np.random.default_rng(a.seed)
    starts = rng.integers(0, len(toks) - a.seq - 1, a.windows)
    tokens = torch.tensor(np.stack([toks[s:s + a.seq] for s in starts]))
    positions = torch.arange(a.seq).expand(a.windows, a.seq)
    trace = {}
    with torch.no_grad():
        R.forward(params, cfg, tokens, positions, trace=trace)
    print(f"model {ck}: {a.windows} training windows of {a.seq} tokens")
    print("subsampler  scores   mean     std  mean/std  window (mean/std)  positive  target  median  skewness")
    for j in range(cfg["num_subsamplers"]):
        s = trace[f"scores_raw/{j}"].flatten().numpy().astype(np.float64)
        r = cfg["retentions"][j]
        lo, hi = (0.8139535143 * math.atanh(2 * p - 1) for p in (r - 0.05, r + 0.05))
        mu, sd = s.mean(), s.std()
        print(f"{j:10d} {s.size:7d} {mu:7.3f} {sd:7.3f} {mu / sd:9.3f}  [{lo:.3f}, {hi:.3f}]    "
              f"{(s > 0).mean():8.3f} {r:7.2f} {np.median(s):7.3f} {((s - mu) ** 3).mean() / sd ** 3:9.2f}")


if __name__ == "__main__":
    main()
