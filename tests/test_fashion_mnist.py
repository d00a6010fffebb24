"""FashionMNISTDataModule reads idx files through torchvision; tiny files written here, so CI needs no package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from lightning_vitcompress.fashion_mnist import (
    MEAN,
    STD,
    FashionMNISTDataModule,
    FashionMNISTNotFoundError,
    prepare_raw_files,
)


def _write_idx(folder: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor, packed: bool) -> None:
    """idx3 (images) and idx1 (labels), big-endian headers, as in the real files."""
    n = len(labels)
    blobs = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x0803, n, 28, 28)
        + images.to(torch.uint8).numpy().tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x0801, n) + labels.to(torch.uint8).numpy().tobytes(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        if packed:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(blob)
        else:
            (folder / name).write_bytes(blob)


def _fake_dataset(folder: Path, packed: bool = True, n_train: int = 40, n_test: int = 12) -> dict[str, torch.Tensor]:
    """Image i is filled with the value i (so a sample's identity can be read back from its pixels)."""
    train = torch.arange(n_train).view(-1, 1, 1).expand(-1, 28, 28)
    test = (100 + torch.arange(n_test)).view(-1, 1, 1).expand(-1, 28, 28)
    train_labels, test_labels = torch.arange(n_train) % 10, (torch.arange(n_test) * 3) % 10
    _write_idx(folder, "train", train, train_labels, packed)
    _write_idx(folder, "t10k", test, test_labels, packed)
    return {"train_labels": train_labels, "test_labels": test_labels}


def _pixel_values(images: torch.Tensor) -> torch.Tensor:
    """The byte each (unaugmented) normalised image was filled with."""
    return torch.round((images[:, 0, 0, 0] * STD + MEAN) * 255).long()


def test_reads_the_apt_package_layout_through_torchvision(tmp_path):
    system = tmp_path / "usr_share"
    truth = _fake_dataset(system, packed=True)
    dm = FashionMNISTDataModule(
        root=tmp_path / "data", system_dir=system, batch_size=8, val_size=10, train_subset=25, augment=False
    )
    dm.setup("fit")
    assert sorted((tmp_path / "data" / "FashionMNIST" / "raw").iterdir()) == sorted(
        tmp_path / "data" / "FashionMNIST" / "raw" / n
        for n in (
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
        )
    )
    test_images, test_labels = next(iter(torch.utils.data.DataLoader(dm.test_set, batch_size=100)))
    assert test_images.shape == (12, 1, 28, 28)  # the whole test file, in order
    assert torch.equal(_pixel_values(test_images), 100 + torch.arange(12))
    assert torch.equal(test_labels, truth["test_labels"])
    train_images, train_labels = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=100)))
    val_images, _ = next(iter(torch.utils.data.DataLoader(dm.val_set, batch_size=100)))
    assert len(train_labels) == 25 and len(val_images) == 10
    train_ids, val_ids = set(_pixel_values(train_images).tolist()), set(_pixel_values(val_images).tolist())
    assert not train_ids & val_ids  # the validation hold-out is never trained on
    assert torch.equal(train_labels, truth["train_labels"][_pixel_values(train_images)])  # labels stay with images


def test_same_split_seed_same_subset_and_another_seed_another(tmp_path):
    _fake_dataset(tmp_path / "data" / "FashionMNIST" / "raw", packed=False)  # already unpacked: read in place

    def ids(seed: int) -> list[int]:
        dm = FashionMNISTDataModule(
            root=tmp_path / "data", system_dir=None, val_size=5, train_subset=10, split_seed=seed, augment=False
        )
        dm.setup()
        return _pixel_values(dm.train_set.tensors[0]).tolist()

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)


def test_augmentation_flips_and_shifts_by_at_most_two_pixels_and_keeps_labels(tmp_path):
    from lightning_vitcompress.fashion_mnist import _Augmented

    image = torch.zeros(1, 28, 28)
    image[0, 10, 6] = 1.0  # one bright pixel, off the vertical axis so a flip shows
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        out, label = _Augmented(image.unsqueeze(0), torch.tensor([7]))[0]
        assert out.shape == (1, 28, 28) and int(label) == 7 and out.sum() == 1.0
        row, col = (int(i) for i in (out[0] == 1).nonzero()[0])
        assert abs(row - 10) <= 2 and (abs(col - 6) <= 2 or abs(col - 21) <= 2)  # 21 = 27 - 6: flipped
        seen.add((row, col))
    assert any(c > 13 for _, c in seen) and any(c < 13 for _, c in seen)  # both flipped and not
    assert len(seen) > 5  # and shifted


def test_missing_files_name_the_apt_package_and_download(tmp_path):
    with pytest.raises(FashionMNISTNotFoundError) as info:
        prepare_raw_files(tmp_path / "data", system_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get update && apt-get install dataset-fashion-mnist" in message
    assert "download=True" in message and str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message
    with pytest.raises(FashionMNISTNotFoundError):  # the module says the same at setup
        FashionMNISTDataModule(root=tmp_path / "data", system_dir=tmp_path / "nowhere").setup()


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(batch_size=0), "batch_size"), (dict(train_subset=-3), "train_subset"), (dict(val_size=-1), "val_size")],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FashionMNISTDataModule(**kwargs)


def test_subset_larger_than_the_training_file_is_refused_at_setup(tmp_path):
    _fake_dataset(tmp_path / "raw_gz")
    dm = FashionMNISTDataModule(root=tmp_path / "data", system_dir=tmp_path / "raw_gz", val_size=10, train_subset=31)
    with pytest.raises(ValueError, match="train_subset=31: only 30"):
        dm.setup()
