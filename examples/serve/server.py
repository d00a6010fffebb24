"""Serve an exported ViT (``.pt2`` from ExportOnFit, or an OpenVINO ``.xml``) over HTTP with LitServe.

    python examples/serve/server.py outputs/vit.pt2 --port 8000 --max-batch-size 8
    curl -X POST localhost:8000/predict -H 'Content-Type: application/json' \\
         -d "{\\"image\\": \\"$(base64 -w0 digit.png)\\"}"
    # {"class": 3, "logits": [...]}

The server needs torch (or openvino), litserve, Pillow and numpy: not Lightning, timm,
torchao or lightning-vitcompress. Requests are JSON ``{"image": "<base64 PNG/JPEG>"}``
of the size the model was exported at; LitServe batches concurrent requests
(``--max-batch-size``, ``--batch-timeout``) into one call of the artifact.

Bad requests are refused where they arrive, before they join a batch (a bad request in
a batch would fail its neighbours): 422 with a message for JSON without ``image``, a
string that is not base64, bytes that are not an image, or an image of another size;
413 for a body over ``--max-payload-bytes``. The server keeps serving.
"""

import argparse
import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any, ClassVar, Optional

import litserve as ls
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, PrivateAttr, model_validator

#: the default request size limit: a 224x224 RGB PNG is about 150 KB, base64 a third more
MAX_PAYLOAD_BYTES = 1_000_000


class ImageRequest(BaseModel):
    """``{"image": "<base64 PNG or JPEG>"}``, checked and decoded when the request arrives (HTTP 422 if bad)."""

    image: str
    #: (channels, height, width) the served model takes; set by :func:`build_server` before the server starts
    input_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    _pixels: Optional[np.ndarray] = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _decode(self) -> "ImageRequest":
        channels, height, width = self.input_shape
        try:
            data = base64.b64decode(self.image, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"'image' is not base64 ({err}); send the PNG/JPEG file's bytes base64-encoded") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.size != (width, height):  # read from the header, before decoding any pixel
                    raise ValueError(
                        f"the image is {image.size[0]}x{image.size[1]} pixels; this model takes "
                        f"{width}x{height}: resize it before sending"
                    )
                pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"'image' is not a PNG/JPEG image ({type(err).__name__}: {err})") from None
        self._pixels = pixels.reshape(height, width, channels)
        return self

    def pixels(self) -> np.ndarray:
        """The image as uint8 (height, width, channels)."""
        assert self._pixels is not None
        return self._pixels


def encode_image(pixels: np.ndarray, format: str = "PNG") -> str:
    """A uint8 (H, W, C) or (H, W) array as the base64 string a request sends."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(buffer, format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def preprocess(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (C, H, W) in the training data's normalisation: (x / 255 - mean) / std."""
    return ((pixels.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1).copy()


def load_runner(path: str, num_threads: int) -> Any:
    """``fn(float32 (N, C, H, W) array) -> logits array`` for a ``.pt2`` (torch) or an OpenVINO ``.xml``."""
    if path.endswith(".xml"):
        import openvino as ov

        core = ov.Core()
        ir = core.read_model(path)
        hint = ir.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
        model = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": num_threads})
        return lambda images: np.asarray(model(images)[0])
    import torch
    from torch._inductor import aoti_load_package

    torch.set_num_threads(num_threads)
    runner = aoti_load_package(path)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return runner(torch.from_numpy(images)).float().numpy()

    return run


class ArtifactAPI(ls.LitAPI):
    """Classifies the images of a batch of requests with one call of the exported model."""

    def __init__(
        self,
        path: str,
        mean: float = 0.5,
        std: float = 0.5,
        num_threads: int = 1,
        max_batch_size: int = 8,
        batch_timeout: float = 0.005,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.path, self.mean, self.std, self.num_threads = path, mean, std, num_threads

    def setup(self, device: str) -> None:
        self.run = load_runner(self.path, self.num_threads)

    def decode_request(self, request: ImageRequest) -> np.ndarray:
        return preprocess(request.pixels(), self.mean, self.std)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)

    def unbatch(self, logits: np.ndarray) -> list[np.ndarray]:
        return list(logits)

    def encode_response(self, logits: np.ndarray) -> dict[str, Any]:
        return {"class": int(np.argmax(logits)), "logits": [float(v) for v in logits]}


def build_server(
    path: str,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    *,
    mean: float = 0.5,
    std: float = 0.5,
    num_threads: int = 1,
    max_batch_size: int = 8,
    batch_timeout: float = 0.005,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    timeout: float = 30.0,
) -> ls.LitServer:
    """A LitServer for the artifact at ``path`` (one CPU worker; requests are checked against ``input_shape``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such artifact; export one with ExportOnFit('vit.pt2') first.")
    if not path.endswith((".pt2", ".xml")):
        raise ValueError(f"{path}: serve a .pt2 (AOTInductor) or an OpenVINO .xml file.")
    ImageRequest.input_shape = tuple(input_shape)  # type: ignore[assignment] - read by the forked API server
    api = ArtifactAPI(path, mean, std, num_threads, max_batch_size, batch_timeout)
    return ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=1, timeout=timeout, max_payload_size=max_payload_bytes
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="the .pt2 or OpenVINO .xml ExportOnFit wrote")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--input-shape", type=int, nargs=3, default=(3, 32, 32), metavar=("C", "H", "W"))
    parser.add_argument("--mean", type=float, default=0.5, help="the training data's normalisation (digits: 0.5)")
    parser.add_argument("--std", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SERVE_THREADS", 1)))
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds to wait to fill a batch")
    parser.add_argument("--max-payload-bytes", type=int, default=MAX_PAYLOAD_BYTES)
    args = parser.parse_args(argv)
    server = build_server(
        args.artifact,
        tuple(args.input_shape),
        mean=args.mean,
        std=args.std,
        num_threads=args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        max_payload_bytes=args.max_payload_bytes,
    )
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
