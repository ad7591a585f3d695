#!/usr/bin/env python3
"""Turns the raw outputs of scripts/gpu_check.sh into gpu_report.json and gpu_report.md.

Usage: gpu_report.py REPORT_DIR

Reads gpu.txt, steps.tsv, tests.json (GoogleTest), attention.jsonl, train_*.json (subllm bench
train with its LLaMA baseline), torch_*.json (bench/pytorch_gpu_bench.py) and infer_*.json, and
judges each figure the CUDA backend issue asks for. A missing or broken input is reported as
such, never as a pass.
"""
import json
import os
import sys


def load_json(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return json.loads(text.splitlines()[-1]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def load_jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return rows


def tests_summary(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {"ran": False}
    passed, failed, skipped = [], [], []
    for suite in data.get("testsuites", []):
        for case in suite.get("testsuite", []):
            name = f"{suite['name']}.{case['name']}"
            if case.get("failures"):
                failed.append({"name": name, "message": "\n".join(f.get("failure", "") for f in case["failures"])[:2000]})
            elif case.get("result") == "SKIPPED":
                skipped.append(name)
            else:
                passed.append(name)
    return {"ran": True, "passed": len(passed), "failed": len(failed), "skipped": len(skipped),
            "failures": failed, "skipped_names": skipped}


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gpu_report.py REPORT_DIR")
    rd = sys.argv[1]
    p = lambda name: os.path.join(rd, name)
    try:
        gpu = open(p("gpu.txt")).read().strip()
    except OSError:
        gpu = "unknown"
    steps = []
    try:
        with open(p("steps.tsv")) as f:
            next(f)
            for line in f:
                name, rc, secs = line.rstrip("\n").split("\t")
                steps.append({"step": name, "exit": int(rc), "seconds": int(secs)})
    except (OSError, ValueError, StopIteration):
        pass

    tests = tests_summary(p("tests.json"))
    attention = load_jsonl(p("attention.jsonl"))
    train = {k: load_json(p(f"train_{k}.json")) for k in ("d1024_t2048", "1p3b_t4096")}
    torch = {f"{m}_{k}": load_json(p(f"torch_{m}_{k}.json"))
             for m in ("llama", "subllm") for k in ("d1024_t2048", "1p3b_t4096")}
    infer = load_json(p("infer_1p3b_2k.json"))

    checks = []

    def check(name, value, target, ok, unit=""):
        checks.append({"check": name, "value": value, "target": target, "unit": unit,
                       "status": "missing" if value is None else ("pass" if ok else "FAIL")})

    if tests.get("ran"):
        check("GPU tests: none failing, none skipped", f"{tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['skipped']} skipped", "all pass", tests["failed"] == 0 and tests["skipped"] == 0)
    else:
        check("GPU tests: none failing, none skipped", None, "all pass", False)

    for key, label in (("d1024_t2048", "d 1024 / 16 blocks / T 2048"), ("1p3b_t4096", "d 2048 / 24 blocks / T 4096")):
        ours = get(train[key], "baseline", "tokens_per_s")
        peer = get(torch[f"llama_{key}"], "tokens_per_s")
        ratio = ours / peer if ours and peer else None
        check(f"LLaMA training tokens/s against PyTorch, {label}", ratio and round(ratio, 3), ">= 1.0",
              ratio is not None and ratio >= 1.0, "x")
        mfu = get(train[key], "baseline", "mfu")
        check(f"LLaMA training MFU (of the measured cuBLASLt bf16 rate), {label}", mfu and round(100 * mfu, 1),
              "reported", mfu is not None, "%")
        sp = get(train[key], "speedup")
        check(f"SUBLLM/LLaMA training speed, {label}", sp and round(sp, 3), ">= 1.26", sp is not None and sp >= 1.26, "x")
        for who, d in (("subllm LLaMA", get(train[key], "baseline")), ("subllm SUBLLM", train[key]),
                       ("PyTorch LLaMA", torch[f"llama_{key}"])):
            mem = get(d, "peak_device_mb") if who.startswith("subllm") else get(d, "peak_mem_mb")
            check(f"peak GPU memory, {who}, {label}", mem and round(mem), "reported", mem is not None, "MB")

    ft, dec = get(infer, "first_token_speedup"), get(infer, "decode_speedup")
    check("SUBLLM/LLaMA first token at 2k (1.3B)", ft and round(ft, 3), ">= 1.35", ft is not None and ft >= 1.35, "x")
    check("SUBLLM/LLaMA decode at 2k (1.3B)", dec and round(dec, 3), ">= 1.25", dec is not None and dec >= 1.25, "x")

    fwd = next((r for r in attention if r.get("op") == "forward" and r.get("T") == 4096 and r.get("hd") == 128), None)
    bwd = next((r for r in attention if r.get("op") == "backward" and r.get("T") == 4096 and r.get("hd") == 128), None)
    fv = get(fwd, "tflops")
    check("flash attention forward, T 4096, hd 128", fv and round(fv, 1), ">= 300", fv is not None and fv >= 300,
          "TFLOP/s")
    bv = get(bwd, "tflops")
    check("flash attention backward, T 4096, hd 128", bv and round(bv, 1), "reported", bv is not None, "TFLOP/s")

    report = {"gpu": gpu, "steps": steps, "tests": tests, "checks": checks, "attention": attention,
              "train": train, "torch": torch, "infer": infer}
    with open(p("gpu_report.json"), "w") as f:
        json.dump(report, f, indent=1)

    md = [f"# CUDA backend check\n", f"GPU: {gpu}\n", "| check | value | target | status |", "|---|---|---|---|"]
    for c in checks:
        v = "—" if c["value"] is None else f"{c['value']}{(' ' + c['unit']) if c['unit'] else ''}"
        md.append(f"| {c['check']} | {v} | {c['target']} | {c['status']} |")
    md.append("\n## Steps\n\n| step | exit | seconds |\n|---|---|---|")
    md += [f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in steps]
    if tests.get("failures"):
        md.append("\n## Failing tests\n")
        for t in tests["failures"]:
            md.append(f"### {t['name']}\n\n```\n{t['message']}\n```")
    if attention:
        md.append("\n## Attention kernels\n\n| op | T | hd | ms | TFLOP/s |\n|---|---|---|---|---|")
        md += [f"| {r.get('op')} | {r.get('T')} | {r.get('hd')} | {r.get('ms')} | {r.get('tflops')} |" for r in attention]
    md.append("\n## Training (tokens/s)\n\n| shape | subllm LLaMA | subllm SUBLLM | PyTorch LLaMA | PyTorch SUBLLM |"
              "\n|---|---|---|---|---|")
    for key in ("d1024_t2048", "1p3b_t4096"):
        f = lambda x: "—" if x is None else f"{x:.0f}"
        md.append(f"| {key} | {f(get(train[key], 'baseline', 'tokens_per_s'))} | {f(get(train[key], 'tokens_per_s'))} | "
                  f"{f(get(torch['llama_' + key], 'tokens_per_s'))} | {f(get(torch['subllm_' + key], 'tokens_per_s'))} |")
    with open(p("gpu_report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
