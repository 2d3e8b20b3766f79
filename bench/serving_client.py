#!/usr/bin/env python3
"""Concurrent streaming completions against an OpenAI-compatible server (Tessera or llama-server).

For each concurrency C in --streams, sends C requests at once (one thread each), every one with its own
prompt of about --prompt tokens, greedy, --gen tokens with the model's end-of-generation tokens banned through
`logit_bias` (so every request generates exactly --gen tokens on either server), `stream: true`. Prints one
JSON line per C:

    {"streams": C, "wall_s", "generated", "tok_s", "ttft_mean_s", "ttft_max_s", "prompt_tokens", "short"}

generated / tok_s count the completion tokens the servers' usage reports (or, without usage, the text chunks);
"short" counts requests that returned fewer than --gen tokens (0 when the comparison is fair).
Standard library only (urllib + threads), so it runs wherever python3 does.
"""

import argparse
import json
import threading
import time
import urllib.request

WORDS = (
    "the river runs past old mills and quiet fields where farmers talk about weather prices "
    "markets trains letters songs winter harvest bridges lanterns"
).split()


def prompt_text(i: int, n_words: int) -> str:
    # A different text per request: a rotation of the word list, numbered.
    return f"Story {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n_words))


def one(url, body, out, i, t0):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    ttft, chunks, usage = None, 0, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev.get("choices") or []:
                if c.get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    out[i] = {"ttft": ttft, "chunks": chunks, "usage": usage, "end": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", default=None, help="model id to send (absent: none)")
    ap.add_argument("--prompt", type=int, default=16, help="words per prompt (~tokens)")
    ap.add_argument("--gen", type=int, default=32, help="tokens to generate per request")
    ap.add_argument("--streams", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--ban", default="", help="comma-separated end-of-generation token ids to ban")
    args = ap.parse_args()
    url = args.url.rstrip("/") + "/v1/completions"
    bias = {t: -100 for t in args.ban.split(",") if t}
    for c in [int(s) for s in args.streams.split(",")]:
        bodies = []
        for i in range(c):
            b = {
                # Numbered apart per level: no prompt repeats an earlier one (both servers keep prompt caches).
                "prompt": prompt_text(1000 * c + i, args.prompt),
                "max_tokens": args.gen,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": bias,
            }
            if args.model:
                b["model"] = args.model
            bodies.append(b)
        out = [None] * c
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(url, bodies[i], out, i, t0)) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(o["end"] for o in out)
        gen = [o["usage"]["completion_tokens"] if o["usage"] else o["chunks"] for o in out]
        ttfts = [o["ttft"] for o in out if o["ttft"] is not None]
        print(json.dumps({
            "streams": c,
            "wall_s": round(wall, 3),
            "generated": sum(gen),
            "tok_s": round(sum(gen) / wall, 2),
            "ttft_mean_s": round(sum(ttfts) / len(ttfts), 3) if ttfts else None,
            "ttft_max_s": round(max(ttfts), 3) if ttfts else None,
            "prompt_tokens": sum(o["usage"]["prompt_tokens"] for o in out if o["usage"]),
            "short": sum(1 for g in gen if g < args.gen),
        }), flush=True)


if __name__ == "__main__":
    main()
