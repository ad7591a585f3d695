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
Then a tiny SUBLLM ("T(T(T)T)T", retentions 0.6,0.5; score layers calibrated so scores
sit inside and around [0, 1], away from kinks) against
  - a separate loop-based numpy SUBLLM (selection, w_scale, logits, loss) and central
    finite differences of it (entries whose perturbation changes a sort order or clamp
    region are skipped and counted),
  - torch.optim.AdamW with the subsampler parameter groups (to_scores lr x 0.5, no decay),
  - the balancer formula (x_grad + |x_grad| * g, g by hand in numpy), the bypass
    gradient limit (c = 0.5 at step 0; mixed c at step 10000), flipped pairing,
    "only T" == LLaMA bit for bit, config/batch parsing errors.
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
            "structure": "T" * L, "norm_name": "rmsnorm", "mlp_name": "swiglu", "norm_eps": EPS,
            "qk_bias": False}


def make_params(rng, tie=False, n_layers=L):
    # Larger than training init so that every path carries a visible gradient.
    p = {"decoder.embed_tokens.weight": rng.normal(0, 0.5, (V, D))}
    for i in range(n_layers):
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


def write_case(d, cfg, params, tokens, targets, positions=None, optim=None, extra=None):
    """`extra`: more batch tensors (step, choices/j)."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    ref.write_safetensors(os.path.join(d, "model.safetensors"), params)
    batch = {"tokens": tokens, "targets": targets}
    if positions is not None:
        batch["positions"] = positions.astype(np.int32)
    for k, v in (extra or {}).items():
        batch[k] = np.asarray(v, dtype=np.int32)
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


def np_block(p, li, x, pos):
    """Block li on one sequence x (n, D) at RoPE positions pos (n,), causal in row order."""
    n = x.shape[0]
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
    return h + (g / (1 + np.exp(-g)) * u) @ p[pre + "feedforward.swiglu.w3.weight"].T


def np_forward_seq(p, toks, pos, tie):
    x = p["decoder.embed_tokens.weight"][toks].copy()
    for li in range(L):
        x = np_block(p, li, x, pos)
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
# independent numpy SUBLLM forward (training mode), one sequence at a time
# ----------------------------------------------------------------------------

def closing_rank(structure, j):
    """Rank among the ')' of the one closing the j-th '(' (the authors' bypass numbering)."""
    stack, n_open, order = [], 0, []
    for ch in structure:
        if ch == "(":
            stack.append(n_open)
            n_open += 1
        elif ch == ")":
            order.append(stack.pop())
    return order.index(j)


def np_subllm_seq(p, toks, pos, structure, rets, choices):
    """Returns (logits (n, V), info) where info holds per subsampler j the kept indices
    ("kept", j), w_scale ("ws", j), and a signature of every discrete decision (sort
    orders and clamp regions) so finite differences can tell when they changed."""
    info = {"sig": []}
    counters = {"block": 0, "sub": 0}

    def segment(i, x, ps):
        while i < len(structure) and structure[i] != ")":
            ch = structure[i]
            if ch == "T":
                x = np_block(p, counters["block"], x, ps)
                counters["block"] += 1
                i += 1
                continue
            assert ch == "("
            j = counters["sub"]
            counters["sub"] += 1
            flipped = bool(choices.get(j, (0, 0, 0))[0])
            s = x @ p[f"decoder.downsamplers.{j}.to_scores.weight"][0]
            n = len(s)
            tc = max(1, math.ceil(n * rets[j] - 1e-6))
            rank = np.argsort(-s, kind="stable")  # descending, ties in sequence order
            w = np.minimum(np.maximum(s, 0.0), 1.0)
            wk = w[rank[:tc]]
            wd = np.zeros(tc)
            rest = w[rank[tc:2 * tc]]
            wd[:len(rest)] = rest
            if flipped:
                wd = wd[::-1]
            ws_rank = wk - wd
            kept = np.sort(rank[:tc])
            ws = np.array([ws_rank[list(rank[:tc]).index(k)] for k in kept])
            info["sig"].append((tuple(rank), tuple(np.sign(s)), tuple(np.sign(s - 1.0))))
            info[("kept", j)] = kept
            info[("ws", j)] = ws
            info[("s", j)] = s
            info[("x", j)] = x
            y, i = segment(i + 1, x[kept], ps[kept])
            assert structure[i] == ")"
            i += 1
            u = x.copy()
            for row, k in enumerate(kept):
                u[k] = ws[row] * y[row] + (1.0 - ws[row]) * x[k]
            c = p[f"decoder.bypasses.{closing_rank(structure, j)}.bypass_scale"]
            x = x + c * (u - x)
        return x, i

    x = p["decoder.embed_tokens.weight"][toks].copy()
    x, i = segment(0, x, pos)
    assert i == len(structure)
    x = np_rmsnorm(x, p["decoder.layer_norm.weight"])
    return x @ p["decoder.output_projection.weight"].T, info


def np_subllm(p, tokens, positions, structure, rets, choices=None):
    """Stacked logits (B, T, V) and per-sequence infos."""
    outs = [np_subllm_seq(p, tokens[b], positions[b].astype(np.float64), structure, rets,
                          choices or {}) for b in range(tokens.shape[0])]
    return np.stack([o[0] for o in outs]), [o[1] for o in outs]


def np_xent(lg, targets):
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = targets[b, t]
            if y < 0:
                continue
            row = lg[b, t]
            m = row.max()
            total += (m + math.log(np.exp(row - m).sum())) - row[y]
            count += 1
    return total / count


def np_balancer_grad(s, r):
    """d(balancer loss)/ds by hand (all of s one channel), rescaled to RMS 0.04."""
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    n = s.size
    mu = s.mean()
    uv = (s * s).mean()
    var = uv - mu * mu
    sigma, rho = math.sqrt(max(var, 1e-20)), math.sqrt(max(uv, 1e-20))

    def atanh(v):
        return 0.5 * (math.log(1 + v + 1e-10) - math.log(1 - v + 1e-10))

    p_lo, p_hi = min(max(r - 0.05, 0.0), 1.0), min(max(r + 0.05, 0.0), 1.0)
    m_lo, m_hi = 0.8139535143 * atanh(2 * p_lo - 1), 0.8139535143 * atanh(2 * p_hi - 1)
    rho_lo, rho_hi = 1.25331413732, 4 * 1.25331413732
    m = mu / sigma
    # d mu/ds = 1/n; d uv/ds = 2s/n; d sigma/ds = (s - mu)/(n sigma); d rho/ds = s/(n rho)
    dmu, dsig, drho = np.full(n, 1.0 / n), (s - mu) / (n * sigma), s / (n * rho)
    g = np.zeros(n)
    if m > m_hi or m < m_lo:  # |m - bound|
        dm = (dmu * sigma - mu * dsig) / sigma ** 2
        g += np.sign(m - (m_hi if m > m_hi else m_lo)) * dm
    if rho > rho_hi or rho < rho_lo:  # |log(bound) - log(rho)|
        bound = rho_hi if rho > rho_hi else rho_lo
        g += np.sign(math.log(bound / rho)) * (-drho / rho)
    rms = math.sqrt((g * g).mean())
    return g * (0.04 / max(rms, 1e-20))


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


# ----------------------------------------------------------------------------
# SUBLLM checks
# ----------------------------------------------------------------------------

S_STRUCT = "T(T(T)T)T"
S_RETS = [0.6, 0.5]
S_SEED = 2


def make_subllm_config(structure=S_STRUCT, rets="0.6,0.5"):
    cfg = make_config()
    cfg["decoder_layers"] = structure.count("T")
    cfg["structure"] = structure
    cfg["downsampling_factor_denominator"] = rets
    return cfg


def make_subllm_case(seed=S_SEED, structure=S_STRUCT, rets=S_RETS):
    """Random SUBLLM whose score layers are calibrated on the numpy model so that the
    scores have mean ~0.45 and std ~0.5: many weights inside (0, 1), on both sides of
    the cut, so every path (kept and discarded weights, clamp) carries gradient."""
    rng = np.random.default_rng(seed)
    n_sub = structure.count("(")
    p = make_params(rng, n_layers=structure.count("T"))
    tokens, targets = make_batch(rng)
    pos = np.broadcast_to(np.arange(T), (B, T))
    for j in range(n_sub):
        p[f"decoder.bypasses.{j}.bypass_scale"] = rng.uniform(0.3, 1.0, D)
        p[f"decoder.downsamplers.{j}.to_scores.weight"] = np.zeros((1, D))
    noise = [rng.normal(0, 1, D) for _ in range(n_sub)]
    for j in range(n_sub):  # subsampler j's input depends only on scores < j
        p = {k: np.asarray(v, dtype=np.float32).astype(np.float64) for k, v in p.items()}
        _, infos = np_subllm(p, tokens, pos, structure, rets)
        X = np.concatenate([i[("x", j)] for i in infos])
        mean = X.mean(0)
        w = noise[j] * 0.5 / (X @ noise[j]).std()
        w = w + (0.45 - (X @ w).mean()) * mean / (mean @ mean)
        p[f"decoder.downsamplers.{j}.to_scores.weight"] = w[None, :]
    p = {k: np.asarray(v, dtype=np.float32).astype(np.float64) for k, v in p.items()}
    return p, tokens, targets


def run_inproc(d, dtype="float64"):
    """ref.run in this process (no torch start-up); returns what it wrote, as numpy."""
    try:
        ref.run(d, torch.float64 if dtype == "float64" else torch.float32)
    except ref.ReferenceError as e:
        return None, str(e)
    out, _ = ref.read_safetensors(os.path.join(d, "reference.safetensors"))
    return out, ""


def sig_of(infos):
    return tuple(tuple(i["sig"]) for i in infos)


def subllm_fd(label, params, out, tokens, targets, pos, structure, rets, spec, rng):
    """Central differences of the numpy SUBLLM loss; an entry whose +-h perturbation
    changes any discrete decision (order, clamp region) is skipped."""
    h = 1e-5
    _, infos = np_subllm(params, tokens, pos, structure, rets)
    base = sig_of(infos)
    worst, n_done, n_skip = 0.0, 0, 0
    for name, count in spec:
        g_ref = out["grad/" + name].reshape(-1)
        size = params[name].size
        if count is None or count >= size:
            idxs = list(range(size))
        else:
            idxs = [int(np.abs(g_ref).argmax())] + list(rng.choice(size, count - 1,
                                                                   replace=False))
        for idx in idxs:
            vals = []
            for sgn in (1, -1):
                pp = dict(params)
                w = params[name].copy()
                w.reshape(-1)[idx] += sgn * h
                pp[name] = w
                lg, inf = np_subllm(pp, tokens, pos, structure, rets)
                vals.append((np_xent(lg, targets), sig_of(inf)))
            if vals[0][1] != base or vals[1][1] != base:
                n_skip += 1
                continue
            fd = (vals[0][0] - vals[1][0]) / (2 * h)
            an = float(g_ref[idx])
            worst = max(worst, abs(fd - an) / (1e-6 + abs(fd)))
            n_done += 1
            if abs(fd - an) > 1e-7 + 1e-5 * abs(fd):
                check(f"{label} fd {name}[{idx}]", False, f"fd {fd:.9g} ref {an:.9g}")
                return
    check(f"{label} finite differences ({len(spec)} params, {n_done} entries)",
          n_done > 0 and n_skip <= n_done // 10,
          f"worst rel {worst:.2e}, skipped {n_skip}")


def test_subllm(tmp, llama_case, llama_out):
    cfg = make_subllm_config()
    params, tokens, targets = make_subllm_case()
    pos = np.broadcast_to(np.arange(T), (B, T))
    names = list(params)
    n_sub = 2
    tcs = [11, 6]  # ceil(17 * 0.6) = 11, ceil(11 * 0.5) = 6
    optim = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
             "weight_decay": 0.1, "grad_clip": 0.5}
    case = os.path.join(tmp, "subllm")
    write_case(case, cfg, params, tokens, targets, optim=optim, extra={"step": [0]})

    # The fixture keeps scores away from kinks, so finite differences are clean.
    lg_np, infos = np_subllm(params, tokens, pos, S_STRUCT, S_RETS)
    gap = edge = np.inf
    inside_disc = 0
    for inf in infos:
        for j in range(n_sub):
            s = inf[("s", j)]
            srt = np.sort(s)[::-1]
            gap = min(gap, float(np.abs(np.diff(srt)).min()))
            edge = min(edge, float(np.abs(s).min()), float(np.abs(s - 1).min()))
            disc = srt[tcs[j]:2 * tcs[j]]
            inside_disc += int(((disc > 0) & (disc < 1)).sum())
    check("subllm fixture: scores >= 1e-3 from 0, 1 and each other; discarded weights "
          "in (0,1) exist", gap > 1e-3 and edge > 1e-3 and inside_disc >= 2,
          f"gap {gap:.1e} edge {edge:.1e} discarded-in-(0,1) {inside_disc}")

    out, r = run_reference(case, "float64")
    check("subllm reference.py float64 runs", out is not None, (r.stderr or "").strip()[-500:])
    if out is None:
        return
    expected = ({"loss", "logits", "grad_norm"} | {"grad/" + n for n in names}
                | {"updated/" + n for n in names}
                | {f"{k}/{j}" for k in ("kept", "w_scale") for j in range(n_sub)})
    check("subllm output tensor names", set(out) == expected, str(sorted(set(out) ^ expected)))
    check("subllm kept/j I32 (B,Tc), w_scale/j F32 (B,Tc)",
          all(out[f"kept/{j}"].dtype == np.int32 and out[f"kept/{j}"].shape == (B, tcs[j])
              and out[f"w_scale/{j}"].dtype == np.float32
              and out[f"w_scale/{j}"].shape == (B, tcs[j]) for j in range(n_sub)))
    ok_sel = all(np.array_equal(out[f"kept/{j}"][b], infos[b][("kept", j)])
                 and np.allclose(out[f"w_scale/{j}"][b], infos[b][("ws", j)], atol=1e-7)
                 for b in range(B) for j in range(n_sub))
    check("subllm kept/w_scale vs numpy selection", ok_sel)
    check("subllm kept ascending and inside the parent",
          all(np.all(np.diff(out[f"kept/{j}"], axis=1) > 0) and out[f"kept/{j}"].min() >= 0
              and out[f"kept/{j}"].max() < (T if j == 0 else tcs[0]) for j in range(n_sub)))
    e = max_rel_err(out["logits"], lg_np)
    check("subllm logits vs numpy loop forward", e < 1e-6, f"rel {e:.2e}")
    nl = np_xent(lg_np, targets)
    check("subllm loss vs numpy", abs(out["loss"][0] - nl) < 1e-6 * abs(nl),
          f"{out['loss'][0]:.9g} vs {nl:.9g}")

    spec = [("decoder.downsamplers.0.to_scores.weight", None),
            ("decoder.downsamplers.1.to_scores.weight", None),
            ("decoder.bypasses.0.bypass_scale", 6),
            ("decoder.bypasses.1.bypass_scale", 6),
            ("decoder.embed_tokens.weight", 3),
            ("decoder.layers.0.self_attn.q_proj.weight", 3),
            ("decoder.layers.1.feedforward.swiglu.w12.weight", 3),
            ("decoder.layers.2.self_attn.k_proj.weight", 3),
            ("decoder.layers.2.self_attn_layer_norm.weight", 3),
            ("decoder.layers.3.self_attn.v_proj.weight", 3),
            ("decoder.layers.4.feedforward.swiglu.w3.weight", 3),
            ("decoder.layer_norm.weight", 2),
            ("decoder.output_projection.weight", 2)]
    subllm_fd("subllm", params, out, tokens, targets, pos, S_STRUCT, S_RETS, spec,
              np.random.default_rng(11))
    check("subllm score/bypass gradients are non-trivial",
          all(np.abs(out[f"grad/decoder.downsamplers.{j}.to_scores.weight"]).max() > 1e-4
              and np.abs(out[f"grad/decoder.bypasses.{j}.bypass_scale"]).max() > 1e-4
              for j in range(n_sub)))

    # AdamW: to_scores at lr x 0.5 and no decay; bypass_scale no decay.
    tparams = {n: torch.nn.Parameter(torch.tensor(params[n], dtype=torch.float64))
               for n in names}
    for n in names:
        tparams[n].grad = torch.tensor(out["grad/" + n], dtype=torch.float64)
    scores = [tparams[n] for n in names if ".to_scores." in n]
    decay = [tparams[n] for n in names if tparams[n].ndim >= 2 and ".to_scores." not in n]
    no_decay = [tparams[n] for n in names if tparams[n].ndim < 2]
    check("subllm param groups cover every parameter",
          len(scores) + len(decay) + len(no_decay) == len(names) and len(scores) == n_sub)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0},
                             {"params": scores, "weight_decay": 0.0,
                              "lr": 0.5 * optim["lr"]}],
                            lr=optim["lr"], betas=(optim["beta1"], optim["beta2"]),
                            eps=optim["eps"])
    tn = torch.nn.utils.clip_grad_norm_(list(tparams.values()), optim["grad_clip"])
    opt.step()
    check("subllm grad_norm vs clip_grad_norm_",
          abs(float(tn) - out["grad_norm"][0]) < 1e-6 * float(tn))
    worst = max(float(np.abs(tparams[n].detach().numpy() - out["updated/" + n]).max())
                for n in names)
    check("subllm updated params vs torch.optim.AdamW (scores lr x0.5, no decay)",
          worst < 1e-6, f"max abs {worst:.2e}")

    # float32 run: same selection, close numbers.
    o32, msg = run_inproc(case, "float32")
    if o32 is None:
        check("subllm float32 runs", False, msg)
    else:
        same = all(np.array_equal(o32[f"kept/{j}"], out[f"kept/{j}"]) for j in range(n_sub))
        worst = max(max_rel_err(o32[k], out[k]) for k in out
                    if not k.startswith("updated/") and not k.startswith("kept/"))
        check("subllm float32 vs float64 (same kept, loss/logits/grads/w_scale)",
              same and worst < 1e-4, f"worst rel {worst:.2e}")

    # Positions: kept tokens keep their original positions (also when given explicitly).
    pcase = os.path.join(tmp, "subllm_pos")
    odd = np.stack([np.arange(T) * 3 + 1, np.arange(T)[::-1] * 2]).astype(np.int64)
    write_case(pcase, cfg, params, tokens, targets, positions=odd)
    o, msg = run_inproc(pcase)
    if o is None:
        check("subllm explicit positions run", False, msg)
    else:
        lg_odd, _ = np_subllm(params, tokens, odd, S_STRUCT, S_RETS)
        check("subllm arbitrary positions vs numpy forward",
              max_rel_err(o["logits"], lg_odd) < 1e-6)

    # Balancer: in process, to see the gradient arriving at / leaving the balancer.
    ttok = torch.tensor(tokens.astype(np.int64))
    ttgt = torch.tensor(targets.astype(np.int64))
    tpos = torch.tensor(np.array(pos, dtype=np.int64))
    rcfg = ref.load_config(os.path.join(case, "config.json"))

    def traced(choices, tp=None):
        tp = tp or {n: torch.tensor(v, dtype=torch.float64, requires_grad=True)
                    for n, v in params.items()}
        trace = {}
        logits = ref.forward(tp, rcfg, ttok, tpos, step=0, choices=choices, trace=trace)
        ref.loss_fn(logits, ttgt).backward()
        return trace, logits.detach(), tp

    tr_off, lg_off, _ = traced([(False, False, False)] * n_sub)
    tr_on, lg_on, _ = traced([(False, True, False)] * n_sub)
    check("balancer: forward is the identity", torch.equal(lg_on, lg_off))
    for j in range(n_sub):
        s = tr_on[f"scores_raw/{j}"].detach().numpy()
        arriving = tr_on[f"scores/{j}"].grad.numpy()
        leaving = tr_on[f"scores_raw/{j}"].grad.numpy()
        g = np_balancer_grad(s, S_RETS[j]).reshape(s.shape)
        want = arriving + np.abs(arriving) * g
        e = float(np.abs(leaving - want).max() / np.abs(want).max())
        check(f"balancer {j}: score grad == x_grad + |x_grad| * g (numpy g)",
              e < 1e-10 and float(np.abs(leaving - arriving).max()) > 1e-4 *
              float(np.abs(arriving).max()), f"rel {e:.2e}")
        same_arrival = np.allclose(arriving, tr_off[f"scores_raw/{j}"].grad.numpy(),
                                   rtol=1e-12, atol=1e-15)
        check(f"balancer {j}: incoming score gradient unchanged by the balancers",
              same_arrival)
    bcase = os.path.join(tmp, "subllm_bal")
    write_case(bcase, cfg, params, tokens, targets,
               extra={"choices/0": [0, 1, 0], "choices/1": [0, 1, 0]})
    ob, msg = run_inproc(bcase)
    if ob is None:
        check("balancer case runs", False, msg)
    else:
        ok = True
        for j in range(n_sub):
            x = tr_on[f"input/{j}"].detach().numpy()
            gs = tr_on[f"scores_raw/{j}"].grad.numpy()
            gw = np.einsum("bn,bnd->d", gs, x)[None, :]
            ok &= np.allclose(ob[f"grad/decoder.downsamplers.{j}.to_scores.weight"], gw,
                              rtol=1e-6, atol=1e-9)
        check("balancer via choices/j: grad/to_scores == leaving score grad . input", ok)
        check("balancer via choices/j: logits and head gradient unchanged, upstream changed",
              np.array_equal(ob["logits"], out["logits"])
              and np.allclose(ob["grad/decoder.output_projection.weight"],
                              out["grad/decoder.output_projection.weight"], rtol=1e-12,
                              atol=1e-15)
              and max_rel_err(ob["grad/decoder.layers.0.self_attn.q_proj.weight"],
                              out["grad/decoder.layers.0.self_attn.q_proj.weight"]) > 1e-6)

    # Bypass gradient limit.
    def limit_case(c_values, step, label):
        pl = dict(params)
        for j in range(n_sub):
            pl[f"decoder.bypasses.{j}.bypass_scale"] = c_values[j]
        lcase = os.path.join(tmp, "subllm_lim")
        write_case(lcase, cfg, pl, tokens, targets, extra={"step": [step]})
        o_off, m1 = run_inproc(lcase)
        write_case(lcase, cfg, pl, tokens, targets,
                   extra={"step": [step], "choices/0": [0, 0, 1], "choices/1": [0, 0, 1]})
        o_on, m2 = run_inproc(lcase)
        if o_off is None or o_on is None:
            check(f"{label} runs", False, m1 + m2)
            return
        c_min = 0.9 + (0.2 - 0.9) * min(max(step, 0), 20000) / 20000
        flips = {"low": 0, "high": 0}
        ok = True
        for j in range(n_sub):
            n = f"grad/decoder.bypasses.{j}.bypass_scale"
            g, c = o_off[n].astype(np.float64), c_values[j]
            low, high = (g > 0) & (c < c_min), (g < 0) & (c > 1.0)
            flips["low"] += int(low.sum())
            flips["high"] += int(high.sum())
            ok &= np.array_equal(o_on[n], np.where(low | high, -g, g).astype(np.float32))
        others = all(np.array_equal(o_on[k], o_off[k]) for k in o_off
                     if "bypass_scale" not in k)
        check(f"{label}: grads flipped exactly where expected, all else unchanged",
              ok and others and flips["low"] > 0, f"flips {flips} c_min {c_min:.3f}")
        return flips

    limit_case([np.full(D, 0.5)] * n_sub, 0, "limit_on, c = 0.5, step 0")
    rc = np.random.default_rng(3)
    fl = limit_case([np.round(rc.uniform(0.3, 1.3, D), 3) for _ in range(n_sub)], 10000,
                    "limit_on, c in [0.3, 1.3], step 10000 (c_min 0.55)")
    check("limit: the c > 1 branch was exercised", fl is not None and fl["high"] > 0)

    # Flipped pairing with Tp >= 2 Tc: retentions 0.4 (17 -> 7) then 0.5 (7 -> 4, padded).
    fcfg = make_subllm_config(rets="0.4,0.5")
    fcase = os.path.join(tmp, "subllm_flip")
    write_case(fcase, fcfg, params, tokens, targets)
    o_nf, m1 = run_inproc(fcase)
    write_case(fcase, fcfg, params, tokens, targets,
               extra={"choices/0": [1, 0, 0], "choices/1": [1, 0, 0]})
    o_f, m2 = run_inproc(fcase)
    if o_nf is None or o_f is None:
        check("flipped runs", False, m1 + m2)
    else:
        _, inf_nf = np_subllm(params, tokens, pos, S_STRUCT, [0.4, 0.5])
        _, inf_f = np_subllm(params, tokens, pos, S_STRUCT, [0.4, 0.5],
                             choices={0: (1, 0, 0), 1: (1, 0, 0)})
        ok = all(np.allclose(o[f"w_scale/{j}"][b], inf[b][("ws", j)], atol=1e-7)
                 and np.array_equal(o[f"kept/{j}"][b], inf[b][("kept", j)])
                 for o, inf in ((o_nf, inf_nf), (o_f, inf_f))
                 for b in range(B) for j in range(n_sub))
        check("flipped / unflipped kept and w_scale vs numpy", ok)
        check("flipped: same kept tokens, different w_scale/0 (Tp 17 >= 2 Tc 14)",
              o_f["kept/0"].shape == (B, 7)
              and np.array_equal(o_f["kept/0"], o_nf["kept/0"])
              and float(np.abs(o_f["w_scale/0"] - o_nf["w_scale/0"]).max()) > 1e-3)

    # Only T: exactly the LLaMA results, whatever else the batch and config carry.
    lcfg = make_config()
    lcfg["downsampling_factor_denominator"] = "0.6"
    tcase = os.path.join(tmp, "subllm_tonly")
    shutil.copytree(llama_case, tcase)
    with open(os.path.join(tcase, "config.json"), "w") as f:
        json.dump(lcfg, f)
    o, msg = run_inproc(tcase)
    check("structure 'TT' (+ retention key) == LLaMA outputs bit for bit",
          o is not None and set(o) == set(llama_out)
          and all(np.array_equal(o[k], llama_out[k]) for k in o), msg)

    # Config parsing and input errors.
    d = os.path.join(tmp, "subllm_cfg")
    os.makedirs(d, exist_ok=True)

    def cfg_result(**kw):
        c = make_subllm_config()
        c.update(kw)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f)
        try:
            return ref.load_config(os.path.join(d, "config.json"))
        except ref.ReferenceError as e:
            return str(e)

    forms = [cfg_result(downsampling_factor_denominator=v)
             for v in ("0.6,0.5", " 0.6 , 0.5", [0.6, 0.5], ["0.6", "0.5"])]
    check("retention forms: string list, JSON list",
          all(isinstance(f, dict) and f["retentions"] == [0.6, 0.5] for f in forms))
    forms = [cfg_result(downsampling_factor_denominator=v) for v in ("0.6", 0.6, [0.6])]
    check("retention forms: one value for all subsamplers",
          all(isinstance(f, dict) and f["retentions"] == [0.6, 0.6] for f in forms))
    bad = {"unbalanced '('": dict(structure="T(T(T)T"),
           "unbalanced ')'": dict(structure="T)T(T)TT"),
           "empty segment": dict(structure="TT()TTT"),
           "unknown character": dict(structure="T(TxT)TT"),
           "block count": dict(structure="T(T)T"),
           "too many retentions": dict(downsampling_factor_denominator="0.6,0.5,0.4"),
           "no retention": dict(downsampling_factor_denominator=None),
           "retention 0": dict(downsampling_factor_denominator="0.0"),
           "retention > 1": dict(downsampling_factor_denominator="1.5")}
    failed = [k for k, kw in bad.items() if not isinstance(cfg_result(**kw), str)]
    check("bad structures / retentions rejected", not failed, str(failed))
    ecase = os.path.join(tmp, "subllm_err")
    write_case(ecase, cfg, params, tokens, targets, extra={"choices/2": [1, 0, 0]})
    o, msg = run_inproc(ecase)
    check("choices/j beyond the subsamplers rejected", o is None and "choices/2" in msg, msg)
    write_case(ecase, cfg, params, tokens, targets, extra={"choices/0": [1, 0]})
    o, msg = run_inproc(ecase)
    check("choices/j of the wrong shape rejected", o is None, msg)
    p2 = dict(params)
    del p2["decoder.bypasses.1.bypass_scale"]
    write_case(ecase, cfg, p2, tokens, targets)
    o, msg = run_inproc(ecase)
    check("missing bypass_scale rejected", o is None and "bypasses.1" in msg, msg)


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
        # Kept for the SUBLLM "only T" check (the float32 run below overwrites the output).
        case_llama = os.path.join(tmp, "llama_copy")
        shutil.copytree(case, case_llama)
        out_llama = dict(out64)
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

        test_subllm(tmp, case_llama, out_llama)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{_results['passed']} passed, {_results['failed']} failed")
    return 0 if _results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
