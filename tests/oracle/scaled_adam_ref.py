#!/usr/bin/env python3
"""PyTorch reference (oracle) for subllm's ScaledAdam optimizer and Eden schedule.

Usage: /usr/bin/python3 tests/oracle/scaled_adam_ref.py IN.safetensors OUT.safetensors
           [--dtype float64|float32]

Written from the description of the rules (SUBLLM.md section 7 and the header
include/subllm/scaled_adam.h), independently of the C++ code.

IN holds, for every tensor NAME listed (comma separated) in metadata "names":
  init/NAME             the initial parameter
  grads/NAME            [steps, *shape] the raw gradient of every step
and metadata (floats as C99 hex literals, exact): beta1 beta2 eps scalar_lr_scale
param_min_rms param_max_rms scalar_max size_update_period clipping_scale
clipping_update_period steps; lr_scale/NAME; the Eden schedule: base_lr lr_batches
lr_epochs warmup_batches warmup_start eden2 epoch_per_batch (step k, from 0, runs at
batch k + 1 and epoch k * epoch_per_batch).

OUT (F32): traj/NAME [steps, *shape] the parameter after every step; lr, grad_norm,
clip_factor and threshold, each [steps].
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import read_safetensors, write_safetensors  # noqa: E402


def meta_float(meta, key):
    text = meta[key]
    return float.fromhex(text) if "0x" in text.lower() else float(text)


def eden_lr(cfg, batch, epoch):
    big_b = cfg["lr_batches"]
    batch_term = (batch * batch + big_b * big_b) / (big_b * big_b)
    if cfg["eden2"]:
        factor = batch_term ** -0.5
    else:
        big_e = cfg["lr_epochs"]
        epoch_term = (epoch * epoch + big_e * big_e) / (big_e * big_e)
        factor = batch_term ** -0.25 * epoch_term ** -0.25
    if batch < cfg["warmup_batches"]:
        warm = cfg["warmup_start"] + (1.0 - cfg["warmup_start"]) * batch / cfg["warmup_batches"]
    else:
        warm = 1.0
    return cfg["base_lr"] * factor * warm


class Oracle:
    def __init__(self, params, lr_scales, opt):
        self.p = params          # name -> tensor (updated in place)
        self.lr_scales = lr_scales
        self.o = opt
        self.names = list(params)
        self.t = 0
        dt = next(iter(params.values())).dtype
        self.dt = dt
        self.v = {n: torch.zeros_like(x) for n, x in params.items()}
        self.mom = {n: torch.zeros_like(x) for n, x in params.items()}
        self.rms = {}
        self.size_sq = {}
        self.size_hist = {}
        self.window = [0.0] * opt["clipping_update_period"]
        self.threshold = None

    def scalar(self, name):
        return self.p[name].numel() == 1

    def tensor_rms(self, name):
        x = self.p[name]
        return float(torch.sqrt((x * x).sum() / x.numel()))

    def clip(self, norm):
        o = self.o
        period = o["clipping_update_period"]
        k = self.t
        if k > 0:
            self.window[k % period] = norm
            early = k in (10, 20, 40) and k < period
            if k % period == 0 or early:
                # NaN counts as the largest value
                ordered = sorted(self.window, key=lambda z: (math.isnan(z), z))
                if early:
                    ordered = ordered[len(ordered) - k:]
                count = len(ordered)
                med = ordered[min(count - 1, 2 * (count // 4))]
                if not math.isfinite(med):
                    raise RuntimeError("median norm not finite")
                self.threshold = o["clipping_scale"] * med * (2.0 if early else 1.0)
        if not math.isfinite(norm):
            return 0.0
        if self.threshold is None:
            return 1.0
        return min(1.0, self.threshold / (norm + 1e-20))

    def step(self, grads, lr):
        o = self.o
        k = self.t
        period = o["size_update_period"]
        if k == 0:
            for n in self.names:
                if not self.scalar(n):
                    self.rms[n] = self.tensor_rms(n)
                    self.size_sq[n] = 0.0
                    self.size_hist[n] = [0.0] * period
        total = 0.0
        for n in self.names:
            weight = o["scalar_lr_scale"] if self.scalar(n) else self.rms[n]
            total += float((grads[n] ** 2).sum()) * weight * weight
        norm = math.sqrt(total)
        factor = self.clip(norm) if o["clipping_scale"] > 0 else 1.0
        if factor == 0.0:
            grads = {n: torch.zeros_like(g) for n, g in grads.items()}
        elif factor != 1.0:
            grads = {n: g * factor for n, g in grads.items()}

        beta1, beta2, eps = o["beta1"], o["beta2"], o["eps"]
        corr = 1.0 - beta2 ** (k + 1)
        for n in self.names:
            x, g = self.p[n], grads[n]
            lr_n = lr * self.lr_scales[n]
            self.v[n] = beta2 * self.v[n] + (1.0 - beta2) * g * g
            v_used = self.v[n] / corr if corr < 0.99 else self.v[n]
            if self.scalar(n):
                update = -(lr_n * o["scalar_lr_scale"]) * g / (v_used.sqrt() + eps)
            else:
                self.size_hist[n][k % period] = float((x * g).sum())
                on_period = k % period == period - 1
                if on_period:
                    self.rms[n] = self.tensor_rms(n)
                r = self.rms[n]
                update = -lr_n * max(r, o["param_min_rms"]) * g / (v_used.sqrt() + eps)
                if on_period and k > 0:
                    decay = beta2 ** period
                    hist = self.size_hist[n]
                    self.size_sq[n] = decay * self.size_sq[n] + (1.0 - decay) * sum(h * h for h in hist) / period
                    done = (k + 1) // period
                    unbias = math.sqrt(1.0 - decay ** done)
                    grow = -(lr_n * o["scalar_lr_scale"]) * unbias * sum(hist) / (math.sqrt(self.size_sq[n]) + eps)
                    if r < o["param_min_rms"]:
                        grow = 0.0
                    grow = max(-0.1, min(0.1, grow))
                    grow = min(grow, (o["param_max_rms"] - r) / r)
                    update = update + grow * x
            self.mom[n] = beta1 * self.mom[n] + (1.0 - beta1) * update
            x += self.mom[n]
            if self.scalar(n):
                x.clamp_(-o["scalar_max"], o["scalar_max"])
        self.t += 1
        return norm, factor, (self.threshold if self.threshold is not None else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    a = ap.parse_args(argv)
    dt = torch.float64 if a.dtype == "float64" else torch.float32
    tensors, meta = read_safetensors(a.inp)
    names = meta["names"].split(",")
    opt = {key: meta_float(meta, key) for key in
           ("beta1", "beta2", "eps", "scalar_lr_scale", "param_min_rms", "param_max_rms",
            "scalar_max", "clipping_scale")}
    opt["size_update_period"] = int(meta["size_update_period"])
    opt["clipping_update_period"] = int(meta["clipping_update_period"])
    eden = {key: meta_float(meta, key) for key in
            ("base_lr", "lr_batches", "lr_epochs", "warmup_batches", "warmup_start", "epoch_per_batch")}
    eden["eden2"] = meta["eden2"] == "1"
    steps = int(meta["steps"])

    params = {n: torch.tensor(tensors["init/" + n], dtype=dt) for n in names}
    grads = {n: torch.tensor(tensors["grads/" + n], dtype=dt) for n in names}
    scales = {n: meta_float(meta, "lr_scale/" + n) for n in names}
    oracle = Oracle(params, scales, opt)
    traj = {n: [] for n in names}
    lrs, norms, factors, thresholds = [], [], [], []
    for k in range(steps):
        lr = eden_lr(eden, k + 1, k * eden["epoch_per_batch"])
        norm, factor, thr = oracle.step({n: grads[n][k].clone() for n in names}, lr)
        lrs.append(lr)
        norms.append(norm)
        factors.append(factor)
        thresholds.append(thr)
        for n in names:
            traj[n].append(params[n].clone())
    out = {"traj/" + n: torch.stack(traj[n]).numpy() for n in names}
    out["lr"] = torch.tensor(lrs).numpy()
    out["grad_norm"] = torch.tensor(norms).numpy()
    out["clip_factor"] = torch.tensor(factors).numpy()
    out["threshold"] = torch.tensor(thresholds).numpy()
    write_safetensors(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
