"""examples/serve: LitServe serving the .pt2 ExportOnFit wrote, over HTTP on localhost, checked against the live
model; malformed requests get a 4xx with a clear message and the server keeps serving (issue #29)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litserve", reason="the [serve] extra is not installed: pip install 'lightning-vitcompress[serve]'")
pytest.importorskip("PIL", reason="the serving example decodes images with Pillow: pip install pillow")

SERVE = Path(__file__).resolve().parents[1] / "examples" / "serve"
sys.path.insert(0, str(SERVE))
from server import encode_image  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"{}")


@pytest.fixture(scope="module")
def server(served):
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(SERVE / "server.py"),
            str(served["folder"] / "vit.pt2"),
            "--port",
            str(port),
            "--max-batch-size",
            "4",
            "--batch-timeout",
            "0.05",
            "--max-payload-bytes",
            "20000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not answer /health within 90 s"
        time.sleep(0.3)
    yield port
    process.terminate()
    process.wait(timeout=30)


def _digits_as_png(served, count: int) -> tuple[list[bytes], torch.Tensor]:
    """Request bodies of real validation digits (uint8 PNGs) and the float batch the server makes of them."""
    images = next(iter(served["digits"].val_dataloader()))[0][:count]
    pixels = ((images + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    bodies = [json.dumps({"image": encode_image(p.permute(1, 2, 0).numpy())}).encode() for p in pixels]
    return bodies, (pixels.float() / 255 - 0.5) / 0.5  # the server's preprocessing, mean = std = 0.5


def test_served_predictions_over_http_equal_the_live_models_with_concurrent_requests_batched(served, server):
    from concurrent.futures import ThreadPoolExecutor

    bodies, images = _digits_as_png(served, 12)
    with ThreadPoolExecutor(6) as pool:  # concurrent: LitServe batches them (max 4) into one call of the .pt2
        answers = list(pool.map(lambda body: _post(server, body), bodies))
    assert [status for status, _ in answers] == [200] * len(bodies)
    with torch.inference_mode():
        live = served["model"](images)
    served_logits = torch.tensor([answer["logits"] for _, answer in answers])
    assert torch.allclose(served_logits, live, atol=1e-3 * float(live.abs().max())), (served_logits - live).abs().max()
    assert [answer["class"] for _, answer in answers] == live.argmax(-1).tolist()
    assert len(set(live.argmax(-1).tolist())) > 1  # a trained model: the classes differ between digits


def _png(shape: tuple[int, ...]) -> str:
    return encode_image(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize(
    "body, status, message",
    [
        (json.dumps({"image": _png((64, 64, 3))}), 422, "the image is 64x64 pixels; this model takes 32x32"),
        (json.dumps({"image": base64.b64encode(b"GIF? no, text").decode()}), 422, "'image' is not a PNG/JPEG image"),
        (json.dumps({"image": "not base64!"}), 422, "'image' is not base64"),
        (json.dumps({"pixels": [[0, 1], [2, 3]]}), 422, "Field required"),
        ("{not json", 422, "JSON decode error"),
        (json.dumps({"image": "A" * 30_000}), 413, "Payload too large"),
    ],
    ids=["wrong-size", "not-an-image", "not-base64", "no-image-field", "not-json", "too-large"],
)
def test_malformed_requests_get_a_4xx_with_a_clear_message_and_the_server_keeps_serving(
    served, server, body, status, message
):
    got, answer = _post(server, body.encode())
    assert got == status
    detail = answer["detail"]
    assert message in (detail if isinstance(detail, str) else " ".join(d["msg"] for d in detail))
    bodies, images = _digits_as_png(served, 1)
    ok, prediction = _post(server, bodies[0])  # still serving, and still right
    with torch.inference_mode():
        assert ok == 200 and prediction["class"] == int(served["model"](images).argmax())
