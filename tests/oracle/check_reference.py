#!/usr/bin/env python3
"""Self-check of tests/oracle/reference.py.

Usage: /usr/bin/python3 tests/oracle/check_reference.py

Builds a tiny random LLaMA (V 64, d 32, 2 layers, 4 heads, F 48) and batch
(B 2, T 17, some targets -1) in a temporary directory, runs reference.py as a
subprocess and checks its output against
  - a loop-based numpy float64 forward written separately from the torch one,
  - central finite differences of that numpy loss, and torch gradcheck,
  - the float32 run (agreement ~1e-4),
  - torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW for the update,
  - RoPE position handling (explicit positions, shift invariance),
  - tied weights, safetensors round trips and error exits.
Prints "N passed, M failed" and exits non-zero on any failure.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference.py")
sys.path.insert(0, HERE)
import reference as ref  # noqa: E402  (safetensors I/O and gradcheck target)

V, D, L, H, FF = 64, 32, 2, 4, 48
B, T = 2, 17
HD = D // H
EPS = 1e-6
BASE = 10000.0

_results = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    if ok:
        _results["passed"] += 1
        print(f"PASS {name} {detail}")
    else:
        _results["failed"] += 1
        print(f"FAIL {name} {detail}")


def max_rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    return float(np.abs(a - b).max() / scale)


# ----------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------

def make_config(tie=False):
    return {"num_embeddings": V, "decoder_embed_dim": D, "decoder_ffn_embed_dim": FF,
            "decoder_layers": L, "decoder_attention_heads": H, "tie_weights": tie,
            "structure": "T" * L, "norm_name": "rmsnorm", "mlp_name": "swiglu"}


def make_params(rng, tie=False):
    # Larger than training init so that every path carries a visible gradient.
    p = {"decoder.embed_tokens.weight": rng.normal(0, 0.5, (V, D))}
    for i in range(L):
        pre = f"decoder.layers.{i}."
        p[pre + "self_attn_layer_norm.weight"] = 1 + 0.1 * rng.normal(size=D)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            p[pre + f"self_attn.{proj}.weight"] = rng.normal(0, 0.25, (D, D))
        p[pre + "final_layer_norm.weight"] = 1 + 0.1 * rng.normal(size=D)
        p[pre + "feedforward.swiglu.w12.weight"] = rng.normal(0, 0.25, (2 * FF, D))
        p[pre + "feedforward.swiglu.w3.weight"] = rng.normal(0, 0.2, (D, FF))
    p["decoder.layer_norm.weight"] = 1 + 0.1 * rng.normal(size=D)
    if not tie:
        p["decoder.output_projection.weight"] = rng.normal(0, 0.3, (V, D))
    # Round through f32 so the file holds exactly what every check uses.
    return {k: np.asarray(v, dtype=np.float32).astype(np.float64) for k, v in p.items()}


def make_batch(rng):
    tokens = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    targets[0, 3] = targets[0, 10] = targets[1, 0] = targets[1, 16] = -1
    targets[1, 7] = -100
    return tokens.astype(np.int32), targets.astype(np.int32)


def write_case(d, cfg, params, tokens, targets, positions=None, optim=None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    ref.write_safetensors(os.path.join(d, "model.safetensors"), params)
    batch = {"tokens": tokens, "targets": targets}
    if positions is not None:
        batch["positions"] = positions.astype(np.int32)
    ref.write_safetensors(os.path.join(d, "batch.safetensors"), batch)
    if optim is not None:
        with open(os.path.join(d, "optim.json"), "w") as f:
            json.dump(optim, f)


def run_reference(d, dtype="float64"):
    r = subprocess.run([sys.executable, REFERENCE, d, "--dtype", dtype],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, r
    out, _ = ref.read_safetensors(os.path.join(d, "reference.safetensors"))
    return out, r


# ----------------------------------------------------------------------------
# independent numpy forward (loops over heads and rotation pairs)
# ----------------------------------------------------------------------------

def np_rmsnorm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def np_rope(x, pos):
    """x: (T, HD) one head; pos: (T,)."""
    y = np.empty_like(x)
    half = HD // 2
    for i in range(half):
        ang = pos * BASE ** (-2.0 * i / HD)
        c, s = np.cos(ang), np.sin(ang)
        y[:, i] = x[:, i] * c - x[:, i + half] * s
        y[:, i + half] = x[:, i + half] * c + x[:, i] * s
    return y


def np_forward_seq(p, toks, pos, tie):
    x = p["decoder.embed_tokens.weight"][toks].copy()
    n = len(toks)
    for li in range(L):
        pre = f"decoder.layers.{li}."
        a = np_rmsnorm(x, p[pre + "self_attn_layer_norm.weight"])
        q = a @ p[pre + "self_attn.q_proj.weight"].T
        k = a @ p[pre + "self_attn.k_proj.weight"].T
        v = a @ p[pre + "self_attn.v_proj.weight"].T
        att = np.zeros((n, D))
        for hh in range(H):
            sl = slice(hh * HD, (hh + 1) * HD)
            qh, kh, vh = np_rope(q[:, sl], pos), np_rope(k[:, sl], pos), v[:, sl]
            for t in range(n):
                s = kh[: t + 1] @ qh[t] / math.sqrt(HD)
                w = np.exp(s - s.max())
                w /= w.sum()
                att[t, sl] = w @ vh[: t + 1]
        h = x + att @ p[pre + "self_attn.out_proj.weight"].T
        b = np_rmsnorm(h, p[pre + "final_layer_norm.weight"])
        w12 = p[pre + "feedforward.swiglu.w12.weight"]
        g = b @ w12[:FF].T
        u = b @ w12[FF:].T
        x = h + (g / (1 + np.exp(-g)) * u) @ p[pre + "feedforward.swiglu.w3.weight"].T
    x = np_rmsnorm(x, p["decoder.layer_norm.weight"])
    w_out = p["decoder.embed_tokens.weight"] if tie else p["decoder.output_projection.weight"]
    return x @ w_out.T


def np_logits(p, tokens, positions, tie):
    return np.stack([np_forward_seq(p, tokens[b], positions[b].astype(np.float64), tie)
                     for b in range(tokens.shape[0])])


def np_loss(p, tokens, targets, positions, tie):
    lg = np_logits(p, tokens, positions, tie)
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            y = targets[b, t]
            if y < 0:
                continue
            row = lg[b, t]
            m = row.max()
            total += (m + math.log(np.exp(row - m).sum())) - row[y]
            count += 1
    return total / count


# ----------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------

FD_PARAMS = ["decoder.embed_tokens.weight",
             "decoder.layers.0.self_attn_layer_norm.weight",
             "decoder.layers.0.self_attn.q_proj.weight",
             "decoder.layers.0.self_attn.k_proj.weight",
             "decoder.layers.1.self_attn.v_proj.weight",
             "decoder.layers.1.self_attn.out_proj.weight",
             "decoder.layers.0.feedforward.swiglu.w12.weight",
             "decoder.layers.1.final_layer_norm.weight",
             "decoder.layers.1.feedforward.swiglu.w3.weight",
             "decoder.layer_norm.weight",
             "decoder.output_projection.weight"]


def fd_check(label, params, out, tokens, targets, positions, tie, rng, names, per_param=3):
    h = 1e-5
    worst = 0.0
    for name in names:
        g_ref = out["grad/" + name]
        flat = params[name].reshape(-1)
        # Include the largest-gradient entry plus random ones.
        idxs = [int(np.abs(g_ref).argmax())] + list(rng.choice(flat.size, per_param - 1,
                                                               replace=False))
        for idx in idxs:
            pp = dict(params)
            w = params[name].copy()
            wf = w.reshape(-1)
            orig = wf[idx]
            wf[idx] = orig + h
            pp[name] = w
            lp = np_loss(pp, tokens, targets, positions, tie)
            wf[idx] = orig - h
            lm = np_loss(pp, tokens, targets, positions, tie)
            fd = (lp - lm) / (2 * h)
            an = float(g_ref.reshape(-1)[idx])
            err = abs(fd - an) / (1e-6 + abs(fd))
            worst = max(worst, err)
            if abs(fd - an) > 1e-7 + 1e-5 * abs(fd):
                check(f"{label} fd {name}[{idx}]", False, f"fd {fd:.9g} ref {an:.9g}")
                return
    check(f"{label} finite differences ({len(names)} params)", True, f"worst rel {worst:.2e}")


def test_safetensors(tmp):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(3, 5)).astype(np.float32)
    i = rng.integers(-5, 1000, (4,)).astype(np.int32)
    path = os.path.join(tmp, "rt.safetensors")
    ref.write_safetensors(path, {"a": a, "i": i}, {"k": "v"})
    got, meta = ref.read_safetensors(path)
    check("safetensors F32/I32 round trip",
          np.array_equal(got["a"], a) and np.array_equal(got["i"], i) and meta == {"k": "v"})
    ref.write_safetensors(path, {"a": a}, dtype="BF16")
    got, _ = ref.read_safetensors(path)
    tb = torch.tensor(a).to(torch.bfloat16).float().numpy()
    check("safetensors BF16 matches torch.bfloat16 rounding", np.array_equal(got["a"], tb))
    ref.write_safetensors(path, {"a": a}, dtype="F16")
    got, _ = ref.read_safetensors(path)
    check("safetensors F16 round trip", np.array_equal(got["a"], a.astype(np.float16)
                                                       .astype(np.float32)))
    # Hand-made file: unsorted entries, extra header padding, BF16 bits given directly.
    bits = np.array([0x3F80, 0xC000, 0x0000], dtype="<u2").tobytes()  # 1, -2, 0
    f32 = np.array([1.5, 2.5], dtype="<f4").tobytes()
    hdr = {"z": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]},
           "b": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}
    hj = json.dumps(hdr).encode() + b"      "
    with open(path, "wb") as f:
        f.write(len(hj).to_bytes(8, "little") + hj + bits + f32)
    got, _ = ref.read_safetensors(path)
    check("safetensors hand-made header with padding",
          got["b"].tolist() == [1.0, -2.0, 0.0] and got["z"].tolist() == [1.5, 2.5])


def main():
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="subllm_oracle_check_")
    try:
        test_safetensors(tmp)

        rng = np.random.default_rng(1234)
        cfg = make_config()
        params = make_params(rng)
        tokens, targets = make_batch(rng)
        default_pos = np.broadcast_to(np.arange(T), (B, T))
        optim = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                 "weight_decay": 0.1, "grad_clip": 0.5}
        case = os.path.join(tmp, "main")
        write_case(case, cfg, params, tokens, targets, optim=optim)

        out64, r = run_reference(case, "float64")
        check("reference.py float64 runs", out64 is not None, (r.stderr or "").strip()[-500:])
        if out64 is None:
            raise SystemExit(1)

        names = list(ref.param_shapes(cfg))
        expected = ({"loss", "logits", "grad_norm"} | {"grad/" + n for n in names}
                    | {"updated/" + n for n in names})
        check("output tensor names", set(out64) == expected,
              str(sorted(set(out64) ^ expected)))
        check("output shapes",
              out64["loss"].shape == (1,) and out64["grad_norm"].shape == (1,)
              and out64["logits"].shape == (B, T, V)
              and all(out64["grad/" + n].shape == params[n].shape for n in names))

        # Forward against the loop-based numpy model.
        lg = np_logits(params, tokens, default_pos, False)
        e = max_rel_err(out64["logits"], lg)
        check("logits vs numpy loop forward", e < 1e-6, f"rel {e:.2e}")
        nl = np_loss(params, tokens, targets, default_pos, False)
        check("loss vs numpy cross-entropy", abs(out64["loss"][0] - nl) < 1e-6 * abs(nl),
              f"{out64['loss'][0]:.9g} vs {nl:.9g}")

        # (a) gradients: finite differences of the numpy loss, then torch gradcheck.
        fd_check("untied", params, out64, tokens, targets, default_pos, False, rng, FD_PARAMS)

        tp = {n: torch.tensor(v, dtype=torch.float64) for n, v in params.items()}
        rcfg = ref.load_config(os.path.join(case, "config.json"))
        ttok = torch.tensor(tokens.astype(np.int64))
        ttgt = torch.tensor(targets.astype(np.int64))
        tpos = torch.tensor(np.array(default_pos, dtype=np.int64))
        gname = "decoder.layers.1.self_attn_layer_norm.weight"

        def loss_of(w):
            pp = dict(tp)
            pp[gname] = w
            return ref.loss_fn(ref.forward(pp, rcfg, ttok, tpos), ttgt)

        w0 = tp[gname].clone().requires_grad_(True)
        ok = torch.autograd.gradcheck(loss_of, (w0,), eps=1e-6, atol=1e-7, rtol=1e-5,
                                      raise_exception=False)
        check(f"torch gradcheck on {gname}", ok)

        gn = math.sqrt(sum(float((out64["grad/" + n].astype(np.float64) ** 2).sum())
                           for n in names))
        check("grad_norm is the global L2 norm", abs(gn - out64["grad_norm"][0]) < 1e-6 * gn,
              f"{out64['grad_norm'][0]:.9g} vs {gn:.9g}")
        check("clipping is active in this case", gn > optim["grad_clip"])

        # (b) float32 against float64.
        shutil.copy(os.path.join(case, "reference.safetensors"), os.path.join(tmp, "ref64"))
        out32, r = run_reference(case, "float32")
        check("reference.py float32 runs", out32 is not None, (r.stderr or "").strip()[-500:])
        if out32 is not None:
            worst = max(max_rel_err(out32[k], out64[k]) for k in out64
                        if not k.startswith("updated/"))
            check("float32 vs float64 loss/logits/grads", worst < 1e-4, f"worst rel {worst:.2e}")
            # The first Adam step is lr*g/(|g|+eps): for entries whose gradient is
            # at float32 rounding level (~1e-7 of the largest) it is ill-conditioned,
            # so compare, in units of lr, only where |g| is above 1e-4 of the max.
            gmax = max(float(np.abs(out64["grad/" + n]).max()) for n in names)
            worst_u = 0.0
            for n in names:
                mask = np.abs(out64["grad/" + n]) > 1e-4 * gmax
                if mask.any():
                    diff = np.abs(out32["updated/" + n].astype(np.float64)
                                  - out64["updated/" + n])[mask]
                    worst_u = max(worst_u, float(diff.max()) / optim["lr"])
            check("float32 vs float64 updated params", worst_u < 1e-3,
                  f"worst |diff|/lr {worst_u:.2e} where |g| > 1e-4 max")

        # (c) update against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW.
        tparams = {n: torch.nn.Parameter(torch.tensor(params[n], dtype=torch.float64))
                   for n in names}
        for n in names:
            tparams[n].grad = torch.tensor(out64["grad/" + n], dtype=torch.float64)
        decay = [tparams[n] for n in names if tparams[n].ndim >= 2]
        no_decay = [tparams[n] for n in names if tparams[n].ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=optim["lr"], betas=(optim["beta1"], optim["beta2"]),
                                eps=optim["eps"])
        tn = torch.nn.utils.clip_grad_norm_(list(tparams.values()), optim["grad_clip"])
        opt.step()
        check("torch clip_grad_norm_ total norm matches grad_norm",
              abs(float(tn) - out64["grad_norm"][0]) < 1e-6 * float(tn))
        worst = max(float(np.abs(tparams[n].detach().numpy() - out64["updated/" + n]).max())
                    for n in names)
        check("updated params vs torch.optim.AdamW step", worst < 1e-6, f"max abs {worst:.2e}")
        moved = all(not np.array_equal(out64["updated/" + n], params[n]) for n in names)
        check("every parameter moved", moved)

        # RoPE positions: explicit 0..T-1 equals default; a constant shift keeps
        # attention scores (relative rotation) and so the logits; arbitrary positions
        # follow the numpy model.
        pos_case = os.path.join(tmp, "pos")
        write_case(pos_case, cfg, params, tokens, targets, positions=np.array(default_pos))
        o, r = run_reference(pos_case)
        check("explicit default positions == implicit",
              o is not None and np.array_equal(o["logits"], out64["logits"]))
        write_case(pos_case, cfg, params, tokens, targets,
                   positions=np.array(default_pos) + np.array([[5], [123]]))
        o, r = run_reference(pos_case)
        check("constant position shift leaves logits unchanged",
              o is not None and max_rel_err(o["logits"], out64["logits"]) < 1e-6)
        odd = np.stack([np.arange(T) * 3 + 1, np.arange(T)[::-1] * 2]).astype(np.int64)
        write_case(pos_case, cfg, params, tokens, targets, positions=odd)
        o, r = run_reference(pos_case)
        if o is not None:
            e = max_rel_err(o["logits"], np_logits(params, tokens, odd, False))
            check("arbitrary positions vs numpy forward", e < 1e-6, f"rel {e:.2e}")
            check("arbitrary positions change the logits",
                  max_rel_err(o["logits"], out64["logits"]) > 1e-3)
        else:
            check("arbitrary positions run", False, r.stderr.strip()[-500:])

        # Tied weights: no output projection; the embedding gets both gradients.
        tie_case = os.path.join(tmp, "tie")
        tparams_np = make_params(np.random.default_rng(99), tie=True)
        write_case(tie_case, make_config(tie=True), tparams_np, tokens, targets)
        o, r = run_reference(tie_case)
        check("tied run", o is not None, (r.stderr or "").strip()[-500:])
        if o is not None:
            check("tied: no output_projection outputs",
                  not any("output_projection" in k for k in o))
            e = max_rel_err(o["logits"], np_logits(tparams_np, tokens, default_pos, True))
            check("tied logits vs numpy forward", e < 1e-6, f"rel {e:.2e}")
            fd_check("tied", tparams_np, o, tokens, targets, default_pos, True,
                     np.random.default_rng(5),
                     ["decoder.embed_tokens.weight", "decoder.layer_norm.weight"], per_param=4)

        # Error exits.
        bad = os.path.join(tmp, "bad")
        p2 = dict(params)
        del p2["decoder.layers.1.self_attn.k_proj.weight"]
        write_case(bad, cfg, p2, tokens, targets)
        _, r = run_reference(bad)
        check("missing tensor -> non-zero exit with name",
              r.returncode != 0 and "k_proj" in r.stderr, r.stderr.strip()[-200:])
        p2 = dict(params)
        p2["decoder.layers.0.feedforward.swiglu.w3.weight"] = np.zeros((D, FF + 1))
        write_case(bad, cfg, p2, tokens, targets)
        _, r = run_reference(bad)
        check("shape mismatch -> non-zero exit", r.returncode != 0 and "shape" in r.stderr,
              r.stderr.strip()[-200:])
        write_case(bad, cfg, params, tokens, targets)
        os.remove(os.path.join(bad, "batch.safetensors"))
        _, r = run_reference(bad)
        check("missing file -> non-zero exit", r.returncode != 0 and "missing file" in r.stderr,
              r.stderr.strip()[-200:])
        _, r = run_reference(os.path.join(tmp, "does_not_exist"))
        check("missing dir -> non-zero exit", r.returncode != 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{_results['passed']} passed, {_results['failed']} failed")
    return 0 if _results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
