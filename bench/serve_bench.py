#!/usr/bin/env python3
"""Serving benchmark: drives a real `subllm serve` with concurrent streaming clients.

    bench/serve_bench.py -m MODEL_DIR [--streams 1,4,16] [--tokens 64] [--requests 3]
                         [--parallel 16] [--threads N] [--subllm build/subllm] [--device cpu]
                         [--keep-threshold JSON] [--prompt-words N] [--json]

Starts the server on a free loopback port, then for each concurrency S runs S clients, each
sending --requests streamed completions of --tokens tokens (ignore_eos, greedy) back to back.
Reports per S: aggregate generated tokens/s (all tokens of all clients over the wall time),
p50/p99 time to first token and p50/p99 inter-token latency (gaps between streamed chunks;
the server sends one chunk per pass). Standard library only.
"""
import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = [
    "The old sailor watched the distant harbour",
    "A quiet student remembered a forgotten letter with great care",
    "Our nation built the long road home",
    "The captain questioned the stormy ocean without fear at the end of the day",
]


RETENTION = []  # the last request's kept fraction per subsampler (SUBLLM)


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[k]


KEEP_THRESHOLD = None  # sent with every request when given (SUBLLM: a number or one per subsampler)


def one_request(port, prompt, tokens, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    req = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if KEEP_THRESHOLD is not None:
        req["keep_threshold"] = KEEP_THRESHOLD
    body = json.dumps(req)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError("HTTP %d: %s" % (resp.status, resp.read()[:200]))
    first = None
    last = None
    gaps = []
    generated = 0
    buf = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            data = json.loads(event[6:])
            now = time.perf_counter()
            choice = data["choices"][0] if data.get("choices") else {}
            if choice.get("text"):
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
            if "usage" in data:
                generated = data["usage"]["completion_tokens"]
                RETENTION[:] = data["usage"].get("retention", [])
    conn.close()
    out.append((first, gaps, generated))


def long_prompts(words):
    """The prompts, each continued with the words of the others until it has `words` words."""
    pool = " ".join(PROMPTS).split()
    out = []
    for i, p in enumerate(PROMPTS):
        w = p.split()
        j = 0
        while len(w) < words:
            w.append(pool[(i * 7 + j) % len(pool)])
            j += 1
        out.append(" ".join(w[:words]))
    return out


def run_level(port, streams, tokens, requests):
    results = []
    lock = threading.Lock()
    errors = []

    def client(c):
        local = []
        try:
            for r in range(requests):
                one_request(port, PROMPTS[(c + r) % len(PROMPTS)], tokens, local)
        except Exception as e:  # reported below
            errors.append(str(e))
        with lock:
            results.extend(local)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    ttft = [r[0] for r in results if r[0] is not None]
    gaps = [g for r in results for g in r[1]]
    total = sum(r[2] for r in results)
    return {
        "streams": streams,
        "requests": len(results),
        "generated_tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(gaps, 50),
        "itl_p99_ms": 1e3 * percentile(gaps, 99),
        "retention": list(RETENTION),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, back to back")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--subllm", default="build/subllm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-threshold", default=None,
                    help="JSON: the keep_threshold every request sends, e.g. -0.005 or [-0.005,-0.012]")
    ap.add_argument("--json", action="store_true", help="one JSON line per level instead of a table")
    ap.add_argument("--prompt-words", type=int, default=0,
                    help="lengthen every prompt to this many words (0: the short prompts as they are)")
    a = ap.parse_args()
    cmd = [a.subllm, "serve", "-m", a.model, "--port", "0", "--parallel", str(a.parallel), "--queue", "256",
           "-t", str(a.threads), "--device", a.device]
    global KEEP_THRESHOLD, PROMPTS
    if a.prompt_words > 0:
        PROMPTS = long_prompts(a.prompt_words)
    if a.keep_threshold is not None:
        KEEP_THRESHOLD = json.loads(a.keep_threshold)
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"http://[0-9.]+:(\d+)/", line)
        if not m:
            sys.exit("the server did not start: " + line + server.stdout.read())
        port = int(m.group(1))
        # A short warm-up request so the first level does not pay for first-touch allocations.
        one_request(port, PROMPTS[0], 8, [])
        if not a.json:
            print("model %s, %d slots, %d tokens per request, %d requests per client%s" %
                  (a.model, a.parallel, a.tokens, a.requests,
                   ", prompts of %d words" % a.prompt_words if a.prompt_words > 0 else ""))
            print("%8s %10s %12s %12s %12s %12s %12s" %
                  ("streams", "tokens", "tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"))
        base = None
        for s in [int(x) for x in a.streams.split(",")]:
            r = run_level(port, s, a.tokens, a.requests)
            base = base or r["tokens_per_s"]
            r["speedup_vs_first"] = r["tokens_per_s"] / base
            if a.json:
                print(json.dumps(r))
            else:
                print("%8d %10d %12.1f %10.1fms %10.1fms %10.1fms %10.1fms   x%.2f%s" %
                      (s, r["generated_tokens"], r["tokens_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"],
                       r["itl_p50_ms"], r["itl_p99_ms"], r["speedup_vs_first"],
                       "   retention " + ",".join("%.3f" % x for x in r["retention"]) if r["retention"] else ""))
            sys.stdout.flush()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
