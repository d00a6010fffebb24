"""Drive the LitServe example with concurrent clients: fp32 artifact vs compressed artifact, side by side.

    python examples/serve/load_test.py --seconds 20 --clients 8

Builds a small ViT for digits-sized images (32x32, 65 tokens), exports it twice with
``export_compressed`` (fp32 ``.pt2``; pruned 50% + int8_static_x86 ``.pt2``; and an
OpenVINO NNCF int8 ``.xml`` when openvino/nncf are installed), then for each file starts
``examples/serve/server.py`` on localhost and runs the same ``--clients`` concurrent
clients for the same ``--seconds``, each sending real digit images (PNG) one request at a
time. Prints requests/s and p50/p95/p99 latency per variant, and the failed-request count
(non-200 answers or connection errors), which should be 0. The clients share the CPU with
the server: on a 2-core machine absolute numbers are low; compare the rows.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from server import encode_image  # noqa: E402 - the example's own helper


def digit_requests(count: int = 64) -> list[bytes]:
    """JSON bodies of ``count`` real digits (uint8 32x32 RGB PNGs)."""
    from lightning_vitcompress.digits import load_digits_tensors

    images, _ = load_digits_tensors()
    pixels = ((images[:count] + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [json.dumps({"image": encode_image(p)}).encode() for p in pixels]


def build_artifacts(folder: Path) -> dict[str, Path]:
    """fp32 and compressed files of one small ViT (random weights: speed does not depend on them)."""
    from lightning_vitcompress.digits import load_digits_tensors, small_vit
    from lightning_vitcompress.functional import export_compressed, prune_vit, quantize_model
    from lightning_vitcompress.functional.x86_int8 import cpu_supports_bfloat16

    torch.manual_seed(0)
    images = load_digits_tensors()[0][:32]
    model = small_vit(embed_dim=192, depth=6, num_heads=3).eval()
    files = {"fp32 .pt2": folder / "fp32.pt2"}
    export_compressed(model, files["fp32 .pt2"], images[:8])
    try:
        export_compressed(model, folder / "int8.xml", images[:8], quantize="int8", calibration_data=[images])
        files["OpenVINO NNCF int8 .xml"] = folder / "int8.xml"
    except (ImportError, ValueError) as err:
        print(f"(no OpenVINO row: {err})")
    prune_vit(model, 0.5, images[:1])
    quantize_model(model, "int8_static_x86", example_input=images[:8], calibration_inputs=[images])
    precision = "bf16-mixed" if cpu_supports_bfloat16() else "32-true"
    name = f"pruned 50% + int8 static ({precision}) .pt2"
    files[name] = folder / "compressed.pt2"
    export_compressed(model, files[name], images[:8], inference_precision=precision)
    return files


def start_server(path: Path, port: int, threads: int, timeout: float = 120.0) -> subprocess.Popen:
    """``server.py path`` on localhost:port, once /health answers 200."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), str(path), "--port", str(port), "--threads", str(threads)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"the server for {path} did not answer /health within {timeout:.0f} s")


def drive(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads, each one keep-alive connection sending one request at a time until ``seconds`` pass."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad, sent = [], 0, index
        while time.monotonic() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            start = time.perf_counter()
            try:
                connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            if ok:
                mine.append(time.perf_counter() - start)
            else:
                bad += 1
        with lock:
            latencies.extend(mine)
            failed[0] += bad

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "requests": len(latencies),
        "failed": failed[0],
        "per_s": len(latencies) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per variant")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--threads", type=int, default=1, help="the server's inference threads")
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args(argv)
    bodies = digit_requests()
    from lightning_vitcompress.functional.report import cpu_name

    with tempfile.TemporaryDirectory() as folder:
        files = build_artifacts(Path(folder))
        rows = {}
        for offset, (name, path) in enumerate(files.items()):
            server = start_server(path, args.port + offset, args.threads)
            try:
                drive(args.port + offset, bodies[:4], 2, 1.0)  # warm-up, not counted
                rows[name] = drive(args.port + offset, bodies, args.clients, args.seconds)
            finally:
                server.terminate()
                server.wait(timeout=30)
    base = rows["fp32 .pt2"]["per_s"]
    print(
        f"\nLitServe, {args.clients} clients x {args.seconds:g} s per variant, 1 worker with {args.threads} "
        f"thread(s), max batch 8; CPU: {cpu_name()}; small ViT (192 wide, 6 blocks, 32x32, 65 tokens)\n"
    )
    print("| artifact | requests | failed | requests/s | vs fp32 | p50 (ms) | p95 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['requests']} | {r['failed']} | {r['per_s']:.1f} | {r['per_s'] / base:.2f}x | "
            f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} |"
        )
    if any(r["failed"] for r in rows.values()):
        sys.exit("some requests failed")


if __name__ == "__main__":
    main()
