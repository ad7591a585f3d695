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
clipping_update_period steps; clipping ("per-group", the default, or "global");
lr_scale/NAME; the Eden schedule: base_lr lr_batches lr_epochs warmup_batches
warmup_start eden2 epoch_per_batch (step k, from 0, runs at batch k + 1 and epoch
k * epoch_per_batch).

Clipping groups: per-group puts the tensors that share an lr_scale in one group (as
icefall's get_parameter_groups_with_lrs makes one param group per learning rate, each
clipped by ScaledAdam against its own window), groups ordered by first appearance in
"names"; global makes one group of all tensors.

OUT (F32): traj/NAME [steps, *shape] the parameter after every step; lr and grad_norm
(the whole-model norm), each [steps]; group_grad_norm, group_clip_factor and
group_threshold, each [steps, groups]; group_lr_scale [groups].
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


class ClipWindow:
    """The clipping state of one group: its window of norms and its threshold."""

    def __init__(self, period):
        self.window = [0.0] * period
        self.threshold = None

    def factor(self, k, norm, o):
        period = o["clipping_update_period"]
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
        # group key -> member names, in order of first appearance
        self.groups = {}
        for n in self.names:
            key = lr_scales[n] if opt["clipping"] == "per-group" else "all"
            self.groups.setdefault(key, []).append(n)
        self.windows = {key: ClipWindow(opt["clipping_update_period"]) for key in self.groups}

    def scalar(self, name):
        return self.p[name].numel() == 1

    def tensor_rms(self, name):
        x = self.p[name]
        return float(torch.sqrt((x * x).sum() / x.numel()))

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
        weighted = {}
        for n in self.names:
            weight = o["scalar_lr_scale"] if self.scalar(n) else self.rms[n]
            weighted[n] = float((grads[n] ** 2).sum()) * weight * weight
        norm = math.sqrt(sum(weighted[n] for n in self.names))
        group_norms, group_factors, group_thresholds = [], [], []
        clipped = {}
        for key, members in self.groups.items():
            gnorm = math.sqrt(sum(weighted[n] for n in members))
            win = self.windows[key]
            factor = win.factor(k, gnorm, o) if o["clipping_scale"] > 0 else 1.0
            for n in members:
                if factor == 0.0:
                    clipped[n] = torch.zeros_like(grads[n])
                else:
                    clipped[n] = grads[n] * factor if factor != 1.0 else grads[n]
            group_norms.append(gnorm)
            group_factors.append(factor)
            group_thresholds.append(win.threshold if win.threshold is not None else 0.0)
        grads = clipped

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
        return norm, group_norms, group_factors, group_thresholds


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
    opt["clipping"] = meta.get("clipping", "per-group")
    if opt["clipping"] not in ("per-group", "global"):
        raise ValueError("clipping must be per-group or global")
    eden = {key: meta_float(meta, key) for key in
            ("base_lr", "lr_batches", "lr_epochs", "warmup_batches", "warmup_start", "epoch_per_batch")}
    eden["eden2"] = meta["eden2"] == "1"
    steps = int(meta["steps"])

    params = {n: torch.tensor(tensors["init/" + n], dtype=dt) for n in names}
    grads = {n: torch.tensor(tensors["grads/" + n], dtype=dt) for n in names}
    scales = {n: meta_float(meta, "lr_scale/" + n) for n in names}
    oracle = Oracle(params, scales, opt)
    traj = {n: [] for n in names}
    lrs, norms, group_norms, group_factors, group_thresholds = [], [], [], [], []
    for k in range(steps):
        lr = eden_lr(eden, k + 1, k * eden["epoch_per_batch"])
        norm, gnorms, gfactors, gthresholds = oracle.step({n: grads[n][k].clone() for n in names}, lr)
        lrs.append(lr)
        norms.append(norm)
        group_norms.append(gnorms)
        group_factors.append(gfactors)
        group_thresholds.append(gthresholds)
        for n in names:
            traj[n].append(params[n].clone())
    out = {"traj/" + n: torch.stack(traj[n]).numpy() for n in names}
    out["lr"] = torch.tensor(lrs).numpy()
    out["grad_norm"] = torch.tensor(norms).numpy()
    out["group_grad_norm"] = torch.tensor(group_norms).numpy()
    out["group_clip_factor"] = torch.tensor(group_factors).numpy()
    out["group_threshold"] = torch.tensor(group_thresholds).numpy()
    keys = list(oracle.groups)
    out["group_lr_scale"] = torch.tensor([1.0 if key == "all" else key for key in keys]).numpy()
    write_safetensors(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
