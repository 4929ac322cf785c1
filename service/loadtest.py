"""Measure a running lipcert service over loopback: ``python -m service.loadtest URL``.

- ``/predict`` at batch 1: p50/p95 client-side latency of sequential requests (one PNG).
- ``/predict_tensor``: throughput (images/s) of sequential single-image requests versus
  ``--clients`` concurrent clients, which the server's adaptive batching merges.

Bounded: ``--requests`` per phase and ``--seconds`` of wall time at most per phase.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import time

import numpy as np


def _timed_calls(call, n: int, seconds: float) -> list[float]:
    times = []
    deadline = time.perf_counter() + seconds
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return times


def run(url: str, requests: int, clients: int, seconds: float, model: str | None) -> dict:
    """The measurements as a dict (latencies in ms, throughput in images per second)."""
    import httpx
    from PIL import Image

    with httpx.Client(base_url=url, timeout=60) as c:
        info = c.post("/models").json()
        served = next(m for m in info["models"]
                      if m["name"] == (model or info["default_model"]))
        shape = served["input_shape"]
        rng = np.random.default_rng(0)
        pixels = (rng.random((shape[1], shape[2], shape[0])) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels.squeeze(-1) if shape[0] == 1 else pixels).save(buf, format="PNG")
        png = buf.getvalue()
        form = {"model": served["name"]}

        def predict() -> None:
            r = c.post("/predict", files={"image": ("x.png", png, "image/png")}, data=form)
            r.raise_for_status()

        for _ in range(5):
            predict()
        lat = np.asarray(_timed_calls(predict, requests, seconds)) * 1e3

        body = json.dumps({"images": [rng.random(shape).tolist()], "model": served["name"]})
        headers = {"content-type": "application/json"}

        def tensor() -> None:
            c.post("/predict_tensor", content=body, headers=headers).raise_for_status()

        for _ in range(5):
            tensor()
        t0 = time.perf_counter()
        seq = len(_timed_calls(tensor, requests, seconds))
        seq_rate = seq / (time.perf_counter() - t0)

    with httpx.Client(base_url=url, timeout=60,
                      limits=httpx.Limits(max_connections=clients)) as c2:
        def worker(_: int) -> int:
            done = 0
            deadline = time.perf_counter() + seconds
            for _ in range(max(1, requests // clients)):
                c2.post("/predict_tensor", content=body, headers=headers).raise_for_status()
                done += 1
                if time.perf_counter() > deadline:
                    break
            return done

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            conc = sum(pool.map(worker, range(clients)))
        conc_rate = conc / (time.perf_counter() - t0)
    return {
        "model": served["name"], "input_shape": shape,
        "predict_batch1_ms": {"n": int(lat.size), "p50": float(np.percentile(lat, 50)),
                              "p95": float(np.percentile(lat, 95))},
        "predict_tensor_images_per_s": {"sequential": seq_rate, f"concurrent_{clients}": conc_rate,
                                        "n_sequential": seq, "n_concurrent": conc},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:3000")
    parser.add_argument("--requests", type=int, default=400, help="requests per phase")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="time cap per phase")
    parser.add_argument("--model", default=None, help="model name (default: the default model)")
    args = parser.parse_args()
    print(json.dumps(run(args.url, args.requests, args.clients, args.seconds, args.model),
                     indent=2))


if __name__ == "__main__":
    main()
