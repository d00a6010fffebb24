"""Plain measuring functions: size, parameters, MACs, throughput, latency, accuracy.

No Trainer needed; :class:`~lightning_vitcompress.BenchmarkCallback` and the
scripts in ``benchmarks/`` use exactly these. Timing uses
``torch.utils.benchmark.Timer`` (warm-up, repeated runs, CUDA synchronised) and
quotes the median. Measuring never changes the model's training flag,
parameters or device: it works on the model in ``eval()`` under
``torch.inference_mode`` and restores the flag afterwards.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils import benchmark as torch_benchmark

from lightning_vitcompress._checks import check_positive
from lightning_vitcompress.functional._torch_internals import compiled_call, set_compiled_call
from lightning_vitcompress.models.base import logits_of

Device = Union[str, torch.device]


def resolve_device(device: Device, argument: str = "device") -> torch.device:
    """``torch.device`` for ``"cpu"``/``"cuda"``/``"cuda:1"``; a clear error otherwise."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{argument}={device!r}: pass a device name, 'cpu' or 'cuda' (or 'cuda:N').")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{argument}={device!r} is not a device name; use 'cpu' or 'cuda' (or 'cuda:N').") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"{argument}={device!r}: only 'cpu' and 'cuda' are measured.")
    return resolved


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; each submodule's training flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def thread_count(num_threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(num_threads)``; restores the previous count."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        check_positive(num_threads, "num_threads", "2", integer=True)
        torch.set_num_threads(num_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (quantized tensor subclasses count their logical shape)."""
    return sum(p.numel() for p in model.parameters())


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a checkpoint of the weights costs."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_macs(model: nn.Module, example_input: torch.Tensor) -> Optional[int]:
    """Multiply-accumulates of one forward of ``example_input`` per image (``FlopCounterMode`` / 2).

    ``None`` where the counter cannot count the model: it fails to trace it, or
    its weights are quantized tensor subclasses (torchao), whose kernels the
    counter does not see (it would report a fraction of the real work).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters()):
        return None

    counter = FlopCounterMode(display=False)
    # counted eager: under the counter a compiled module (nn.Module.compile, compile_frozen) would compile
    # again, which costs minutes on a small CPU and counts the same work
    compiled = [(m, compiled_call(m)) for m in model.modules() if compiled_call(m)]
    try:
        for module, _ in compiled:
            set_compiled_call(module, None)
        with eval_mode(model), torch.inference_mode(), counter:
            model(example_input)
    except Exception:
        return None
    finally:
        for module, call in compiled:
            set_compiled_call(module, call)
    return counter.get_total_flops() // 2 // max(1, example_input.shape[0])


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


#: just under glibc's largest dynamic mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB on 64-bit)
_SETTLING_BYTES = 31 * 2**20


def settle_allocator() -> None:
    """Put the C allocator in the state a long-running process is in before timing anything (cheap, idempotent).

    glibc's ``malloc`` serves every block above its mmap threshold (128 KiB in a fresh process) with a new
    ``mmap``, page faults included, on every call, until freeing a larger block raises the threshold (to at
    most 32 MiB). A process that has loaded data has raised it; a fresh benchmark process has not. There,
    int8 dynamic, whose per-call activation buffers fall in between, ran the Fashion-MNIST study's ViT at
    0.56x of fp32 (batch 32, 1 thread, AMD EPYC), and at 1.24x once the threshold was raised: the ranking
    flipped with the allocator, not the kernels. Allocating and freeing one block just under the maximum
    raises it there, where no later free moves it much, so every variant is timed in the same state. With
    another allocator (jemalloc, tcmalloc, macOS) this only allocates and frees one block.

    Example::

        >>> from lightning_vitcompress.functional.measure import settle_allocator
        >>> settle_allocator()  # what compare_throughput, measure_latency and the plan's timing do first
    """
    block = torch.empty(_SETTLING_BYTES, dtype=torch.uint8)
    block[::4096] = 0  # touch each page: the block is really mapped, then unmapped on free
    del block


def _timer(model: nn.Module, example_input: torch.Tensor, num_threads: int) -> torch_benchmark.Timer:
    return torch_benchmark.Timer(
        stmt="model(x)",
        globals={"model": model, "x": example_input},
        num_threads=num_threads,
    )


def _time_once(model: nn.Module, example_input: torch.Tensor, num_threads: int, min_run_time: float) -> float:
    """Median seconds per call of ``model(example_input)`` in one adaptive measurement."""
    with torch.inference_mode():
        return _timer(model, example_input, num_threads).blocked_autorange(min_run_time=min_run_time).median


def compare_throughput(
    models: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    *,
    num_threads: Optional[int] = None,
    rounds: int = 3,
    min_run_time: float = 0.5,
    warmup: int = 2,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, float]:
    """Images/s of each model, measured interleaved (A, B, A, B...), median over rounds.

    All models run on ``example_input``'s device; interleaving spreads the
    machine's drift over every variant, so their *ratios* are what to quote.
    ``progress`` is called after each timed measurement (``rounds x len(models)`` calls).

    Example::

        >>> import copy, timm, torch
        >>> from lightning_vitcompress.functional import compare_throughput, quantize_model
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        >>> quantized = copy.deepcopy(vit)
        >>> summary = quantize_model(quantized, "int8_dynamic")
        >>> ips = compare_throughput({"fp32": vit, "int8": quantized}, torch.randn(4, 3, 32, 32), rounds=1,
        ...                          min_run_time=0.05)
        >>> sorted(ips), ips["int8"] > 0
        (['fp32', 'int8'], True)
    """
    check_positive(rounds, "rounds", "3", integer=True)
    check_positive(min_run_time, "min_run_time", "0.5")
    settle_allocator()
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    batch = example_input.shape[0]
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        with torch.inference_mode():
            for model in models.values():
                for _ in range(warmup):
                    model(example_input)
        for index in range(rounds):
            for name, model in models.items():
                seconds[name].append(_time_once(model, example_input, threads, min_run_time))
                if progress is not None:
                    progress(f"round {index + 1}/{rounds}: {name}")
    return {name: batch / sorted(times)[len(times) // 2] for name, times in seconds.items()}


def measure_latency(
    model: nn.Module,
    example_image: torch.Tensor,
    *,
    num_threads: Optional[int] = None,
    repeats: int = 30,
) -> tuple[float, float]:
    """Batch-1 latency ``(p50, p95)`` in milliseconds over ``repeats`` timed calls after warm-up."""
    check_positive(repeats, "repeats", "30", integer=True)
    example_image = example_image[:1]
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    settle_allocator()
    with eval_mode(model), torch.inference_mode():
        timer = _timer(model, example_image, threads)
        timer.timeit(2)  # warm-up
        times = sorted(timer.timeit(1).raw_times[0] for _ in range(repeats))
    p50 = times[len(times) // 2]
    p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]
    return p50 * 1e3, p95 * 1e3


def first_call_seconds(model: nn.Module, example_input: torch.Tensor) -> float:
    """Wall seconds of one call in inference mode: a compiled model's compile cost, a loaded file's start-up.

    Example::

        >>> import timm, torch
        >>> from lightning_vitcompress.functional.measure import first_call_seconds
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        >>> first_call_seconds(vit, torch.randn(2, 3, 32, 32)) > 0  # a torch.compile'd ViT-B/16: ~15-30 s on 2 cores
        True
    """
    start = time.perf_counter()
    with torch.inference_mode():
        model(example_input)
    if example_input.device.type == "cuda":
        torch.cuda.synchronize(example_input.device)
    return time.perf_counter() - start


#: dict keys under which batches commonly carry their images (transformers uses pixel_values)
IMAGE_KEYS = ("pixel_values", "images", "image", "inputs", "input", "x")


def images_of(batch: Any) -> Optional[torch.Tensor]:
    """The image tensor in a batch: the batch itself, its first element, or a dict's ``pixel_values``/``images``...

    Example::

        >>> images_of((torch.zeros(8, 3, 32, 32), torch.zeros(8))).shape
        torch.Size([8, 3, 32, 32])
        >>> images_of({"pixel_values": torch.zeros(8, 3, 32, 32), "labels": torch.zeros(8)}).shape
        torch.Size([8, 3, 32, 32])
    """
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() >= 3 and batch.is_floating_point() else None
    if isinstance(batch, Mapping):
        for key in IMAGE_KEYS:
            if key in batch:
                return images_of(batch[key])
        return None
    if isinstance(batch, (tuple, list)) and batch:
        return images_of(batch[0])
    return None


#: dict keys under which batches commonly carry their class labels
LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def labels_of(batch: Any) -> Optional[torch.Tensor]:
    """The integer class labels in a batch: a tuple's second element, or a dict's ``labels``/``targets``...

    Example::

        >>> labels_of({"pixel_values": torch.zeros(8, 3, 32, 32), "labels": torch.zeros(8, dtype=torch.long)}).shape
        torch.Size([8])
    """
    found: Any = None
    if isinstance(batch, Mapping):
        found = next((batch[key] for key in LABEL_KEYS if key in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        found = batch[1]
    if isinstance(found, torch.Tensor) and not found.is_floating_point() and found.dim() == 1:
        return found
    return None


def images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a tuple/list or dict batch; ValueError saying what was found otherwise."""
    images, labels = images_of(batch), labels_of(batch)
    if images is None or labels is None:
        shape = {k: type(v).__name__ for k, v in batch.items()} if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"a batch of {shape} holds no (images, labels) pair: accuracy needs a tuple (images, labels) or a dict "
            f"with images under one of {IMAGE_KEYS} and integer labels of shape (batch,) under one of {LABEL_KEYS}"
        )
    return images, labels


def measure_accuracy(
    model: nn.Module, batches: Iterable[Any], *, device: Optional[Device] = None, num_classes: Optional[int] = None
) -> Optional[float]:
    """Top-1 accuracy (torchmetrics) of ``model`` over ``(images, labels)`` or dict batches; None if empty."""
    from torchmetrics.classification import MulticlassAccuracy

    device = torch.device(device) if device is not None else model_device(model)
    metric: Optional[MulticlassAccuracy] = None
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            images, labels = (t.to(device) for t in images_and_labels(batch))
            logits = logits_of(model(images))  # a tensor, a tuple, or an output object with .logits
            if metric is None:
                # measured on one rank only: no cross-process sync
                metric = MulticlassAccuracy(
                    num_classes=num_classes or logits.shape[-1], average="micro", sync_on_compute=False
                ).to(device)
            metric.update(logits, labels)
    return None if metric is None else float(metric.compute())
