"""Fashion-MNIST for accuracy claims: 60,000 train / 10,000 test real 28x28 grey images, 10 classes.

Read by torchvision's own ``FashionMNIST`` reader (the idx format). Offline, the
files come from Debian's ``dataset-fashion-mnist`` package (``apt-get update &&
apt-get install dataset-fashion-mnist``, four ``.gz`` files in
``/usr/share/datasets/fashion-mnist/``): :class:`FashionMNISTDataModule` unpacks
them once into ``<root>/FashionMNIST/raw/``, where torchvision reads them. With a
network, ``download=True`` lets torchvision fetch them into the same folder.

The quickstart and the tests stay on digits (:mod:`lightning_vitcompress.digits`);
this module is for the study (``examples/paper_table.py --dataset fashion-mnist``).

Example (the fit needs the files: ``apt-get install dataset-fashion-mnist``, or the download)::

    >>> import lightning as L
    >>> from lightning_vitcompress.digits import DigitsClassifier
    >>> dm = FashionMNISTDataModule(root="data", train_subset=20_000)
    >>> model = DigitsClassifier(embed_dim=128, depth=4, num_heads=4, image_size=28, in_chans=1)
    >>> L.Trainer(max_epochs=10).fit(model, dm)  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_vitcompress.digits import SplitsDataModule

__all__ = [
    "FASHION_MNIST_FILES",
    "SYSTEM_DIR",
    "FashionMNISTDataModule",
    "FashionMNISTNotFoundError",
    "prepare_raw_files",
]

NUM_CLASSES = 10
IMAGE_SIZE = 28
#: where Debian's ``dataset-fashion-mnist`` package installs the four files
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: the four idx files torchvision's ``FashionMNIST`` reads (unpacked) from ``<root>/FashionMNIST/raw/``
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: per-pixel mean and std of the 60,000 training images (in [0, 1])
MEAN, STD = 0.2860, 0.3530


class FashionMNISTNotFoundError(FileNotFoundError):
    """The idx files are neither in ``<root>/FashionMNIST/raw/`` nor in the system folder."""


def prepare_raw_files(root: Union[str, Path], system_dir: Union[str, Path, None] = SYSTEM_DIR) -> Path:
    """Make sure ``<root>/FashionMNIST/raw/`` holds the four unpacked idx files; return that folder.

    A file already there (unpacked) is kept; a ``.gz`` there or in ``system_dir`` is unpacked
    into it. Raises :class:`FashionMNISTNotFoundError` naming the missing files and how to get them.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    missing = []
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.is_file():
            continue
        sources = [raw / f"{name}.gz"] + ([Path(system_dir) / f"{name}.gz"] if system_dir is not None else [])
        source = next((path for path in sources if path.is_file()), None)
        if source is None:
            missing.append(name)
            continue
        raw.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with gzip.open(source, "rb") as packed, open(partial, "wb") as out:
            shutil.copyfileobj(packed, out)
        partial.replace(target)  # atomic: a killed unpack never leaves a truncated idx file
    if missing:
        where = f"{raw}/" + (f" or {system_dir}/ (as .gz)" if system_dir is not None else "")
        raise FashionMNISTNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)} (looked in {where}). Install them offline with "
            "`apt-get update && apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts the .gz files in "
            f"{SYSTEM_DIR}/), or pass download=True (torchvision downloads them into {raw}/; needs a network), "
            "or put the four idx files there yourself."
        )
    return raw


class _Augmented(Dataset):
    """Random horizontal flip and a random crop after 2-pixel zero padding, on in-memory tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 2) -> None:
        self.images, self.labels, self.padding = images, labels, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        if self.padding:
            p = self.padding
            size = image.shape[-1]
            padded = torch.nn.functional.pad(image, (p, p, p, p), value=float(image.min()))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = padded[..., top : top + size, left : left + size]
        return image, self.labels[index]


class FashionMNISTDataModule(SplitsDataModule):
    """Fashion-MNIST as 1x28x28 normalised tensors: a train subset, a held-out validation split, the full test set.

    Args:
        root: folder holding (or receiving) ``FashionMNIST/raw/``.
        batch_size: images per batch (all loaders).
        train_subset: train on this many images (drawn with ``split_seed`` from the 60,000
            less the validation split); ``None``: all of them. The test set is always the full 10,000.
        val_size: images of the training file held out for validation (never trained on).
        split_seed: seed of the validation split and of the subset.
        augment: random horizontal flip and 2-pixel random crop on the training images.
        download: let torchvision download the files into ``root`` when they are absent (needs a network).
        system_dir: where to look for the Debian package's ``.gz`` files; ``None``: do not look.
        num_workers: DataLoader workers (0: the data sits in memory).
    """

    def __init__(
        self,
        root: Union[str, Path] = "data",
        batch_size: int = 128,
        train_subset: Optional[int] = None,
        val_size: int = 5_000,
        split_seed: int = 0,
        augment: bool = True,
        download: bool = False,
        system_dir: Union[str, Path, None] = SYSTEM_DIR,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive number of images, e.g. 128.")
        if train_subset is not None and (not isinstance(train_subset, int) or train_subset <= 0):
            raise ValueError(
                f"train_subset={train_subset!r}: a positive number of images (e.g. 20000) or None for all."
            )
        if not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"val_size={val_size!r}: a number of images >= 0, e.g. 5000.")
        self.root = Path(root)
        self.batch_size = batch_size
        self.train_subset = train_subset
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.download = download
        self.system_dir = system_dir
        self.num_workers = num_workers
        self.num_classes = NUM_CLASSES
        self.image_size = IMAGE_SIZE
        self.in_chans = 1
        self.train_set: Optional[Dataset] = None

    def prepare_data(self) -> None:
        try:
            prepare_raw_files(self.root, self.system_dir)
        except FashionMNISTNotFoundError:
            if not self.download:
                raise
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(self.root), train=True, download=True)
            FashionMNIST(str(self.root), train=False, download=True)

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import FashionMNIST

        dataset = FashionMNIST(str(self.root), train=train, download=False)
        images = (dataset.data.unsqueeze(1).float() / 255.0 - MEAN) / STD
        return images.contiguous(), dataset.targets.long()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()  # idempotent; a Trainer calls it too, but setup alone must work
        images, labels = self._read(train=True)
        if self.val_size >= len(labels):
            raise ValueError(f"val_size={self.val_size}: the training file holds only {len(labels)} images.")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        val_index, train_index = order[: self.val_size], order[self.val_size :]
        if self.train_subset is not None:
            if self.train_subset > len(train_index):
                raise ValueError(
                    f"train_subset={self.train_subset}: only {len(train_index)} training images remain after "
                    f"val_size={self.val_size}; pass at most that, or None for all."
                )
            train_index = train_index[: self.train_subset]
        train_images, train_labels = images[train_index], labels[train_index]
        if self.augment:
            self.train_set = _Augmented(train_images, train_labels)
        else:
            self.train_set = TensorDataset(train_images, train_labels)
        self.val_set = TensorDataset(images[val_index], labels[val_index])
        self.test_set = TensorDataset(*self._read(train=False))
