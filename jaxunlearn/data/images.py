"""Image-classification data for classifier unlearning: digits, CIFAR binaries, `datasets`.

Every loader returns an `ImageSplits` (train and test `ImageDataset`s) with NHWC float32
images scaled to [0, 1], int32 labels, the class names and, where the data has them,
coarse (super-class) labels for the sub-class scenario.

- `load_digits()`: scikit-learn's bundled 8x8 handwritten digits (1,797 real images,
  offline), the default of the classifier benchmark. Its super-classes are the pairs
  {0,1}, {2,3}, ..., {8,9} (a grouping chosen here; digits have no official one).
- `load_cifar(path)`: CIFAR-10 / CIFAR-100 from the official *binary* archives
  (``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``, or their extracted folders),
  read without unpickling anything; CIFAR-100 carries its 20 super-classes.
- `load_image_folder(folder)`: one sub-folder per class (``train/`` and ``test/`` inside,
  or a single folder split by `test_fraction`); all images must share one size.
- `load_hf_images(name)`: a Hugging Face `datasets` image dataset by name or local path.

References:
  Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009), for the
  CIFAR binary layout (https://www.cs.toronto.edu/~kriz/cifar.html).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_CIFAR_PIXELS = 32 * 32 * 3
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Images with labels.

    Attributes:
      images: float32 [N, H, W, C] in [0, 1].
      labels: int32 [N], indices into `class_names`.
      class_names: the name of each class.
      coarse_labels: int32 [N] super-class of each image, or None.
      coarse_names: the name of each super-class, or None.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    coarse_labels: np.ndarray | None = None
    coarse_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: np.ndarray) -> ImageDataset:
        """The examples at `index` (an int array or a boolean mask)."""
        coarse = None if self.coarse_labels is None else self.coarse_labels[index]
        return dataclasses.replace(
            self, images=self.images[index], labels=self.labels[index], coarse_labels=coarse
        )

    def with_coarse_labels(self) -> ImageDataset:
        """The same images labelled by super-class (for a super-class model)."""
        if self.coarse_labels is None:
            raise ValueError(
                "this dataset has no super-class labels; the sub-class scenario needs data "
                "with coarse labels (CIFAR-100, digits) or a `superclasses=` mapping."
            )
        return dataclasses.replace(self, labels=self.coarse_labels, class_names=self.coarse_names)


@dataclasses.dataclass(frozen=True)
class ImageSplits:
    """Train and test data of one image-classification task.

    Attributes:
      name: a short name ("digits", "cifar10", a folder name), part of cache keys.
      train: the training set.
      test: the test set.
    """

    name: str
    train: ImageDataset
    test: ImageDataset

    def fingerprint(self) -> dict:
        """A content description for cache keys: sizes, shapes and SHA-256 of every array."""

        def digest(x):
            return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]

        return {
            "name": self.name,
            "train": [len(self.train), list(self.train.images.shape[1:]),
                      digest(self.train.images), digest(self.train.labels)],
            "test": [len(self.test), digest(self.test.images), digest(self.test.labels)],
            "classes": list(self.train.class_names),
        }  # fmt: skip


def class_index(dataset: ImageDataset, cls: int | str, *, coarse: bool = False) -> int:
    """The index of class `cls` (an index or a name), or a ValueError listing the classes."""
    names = dataset.coarse_names if coarse else dataset.class_names
    if names is None:
        raise ValueError("this dataset has no super-classes to name.")
    if isinstance(cls, str) and not cls.isdigit():
        if cls not in names:
            raise ValueError(
                f"forget class {cls!r} does not exist; the {len(names)} classes are "
                f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}."
            )
        return names.index(cls)
    idx = int(cls)
    if not 0 <= idx < len(names):
        raise ValueError(
            f"forget class {idx} does not exist: class indices run from 0 to {len(names) - 1} "
            f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''})."
        )
    return idx


def split_train_test(
    images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/test index split (sklearn), deterministic in `seed`."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    index = np.arange(len(labels))
    train, test = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return np.sort(train), np.sort(test)


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> ImageSplits:
    """scikit-learn's 8x8 digits (real, bundled, offline) as an `ImageSplits`.

    Args:
      test_fraction: share of each class held out as the test set (stratified).
      seed: the split's seed.

    Returns:
      Splits with [N, 8, 8, 1] images in [0, 1] and super-classes {0,1}, ..., {8,9}.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    labels = bunch.target.astype(np.int32)
    names = tuple(str(i) for i in range(10))
    coarse = (labels // 2).astype(np.int32)
    coarse_names = tuple(f"{2 * i}-{2 * i + 1}" for i in range(5))
    full = ImageDataset(images, labels, names, coarse, coarse_names)
    train, test = split_train_test(images, labels, test_fraction, seed)
    return ImageSplits("digits", full.subset(train), full.subset(test))


# ----------------------------------------------------------------------------- CIFAR


def _cifar_records(raw: bytes, label_bytes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes CIFAR binary records: `label_bytes` label bytes then 3072 pixel bytes each."""
    size = label_bytes + _CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % size:
        raise ValueError(
            f"{where}: {len(raw)} bytes is not a whole number of {size}-byte CIFAR records; the "
            "file is truncated or not from the official binary archive."
        )
    rec = np.frombuffer(raw, np.uint8).reshape(-1, size)
    # Each image is 1024 red, then green, then blue bytes, each plane row-major 32x32.
    pixels = rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return (pixels.astype(np.float32) / 255.0), rec[:, :label_bytes].astype(np.int32)


class _Archive:
    """Files of an extracted folder or a .tar.gz, looked up by base name."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self.files = {p.name: p for p in path.rglob("*") if p.is_file()}
            self.tar = None
        elif tarfile.is_tarfile(path):
            self.tar = tarfile.open(path)
            self.files = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
        else:
            raise ValueError(
                f"{path} is neither a folder nor a tar archive; pass the official CIFAR binary "
                "archive (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz) or its extracted folder."
            )

    def read(self, name: str) -> bytes:
        item = self.files[name]
        if self.tar is None:
            return item.read_bytes()
        return self.tar.extractfile(item).read()

    def lines(self, name: str) -> tuple[str, ...]:
        text = self.read(name).decode()
        return tuple(line.strip() for line in text.splitlines() if line.strip())


def load_cifar(path: str | os.PathLike) -> ImageSplits:
    """CIFAR-10 or CIFAR-100 from the official binary version (never the pickle one).

    CIFAR-10: ``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin`` (records of
    1 label byte + 3072 pixel bytes) and ``batches.meta.txt``. CIFAR-100: ``train.bin``,
    ``test.bin`` (coarse byte, fine byte, 3072 pixels), ``fine_label_names.txt`` and
    ``coarse_label_names.txt``.

    Args:
      path: the ``.tar.gz`` archive or the folder it extracts to.

    Returns:
      The splits; CIFAR-100 with its 20 super-classes as coarse labels.

    Raises:
      FileNotFoundError: no such path.
      ValueError: the pickle ("python version") archive, missing or truncated files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; download the CIFAR *binary* version.")
    archive = _Archive(path)
    names = set(archive.files)
    if {"data_batch_1", "train", "meta", "batches.meta"} & names and not names & {
        "data_batch_1.bin",
        "train.bin",
    }:
        raise ValueError(
            f"{path} is the CIFAR python (pickle) version, which is refused (unpickling runs "
            "arbitrary code); download the binary version (cifar-10-binary.tar.gz or "
            "cifar-100-binary.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html."
        )
    if "data_batch_1.bin" in names:
        return _cifar10(archive)
    if "train.bin" in names:
        return _cifar100(archive)
    raise ValueError(
        f"{path} holds no CIFAR binary files (expected data_batch_1.bin ... or train.bin; found "
        f"{', '.join(sorted(names)[:8])})."
    )


def _need(archive: _Archive, files: Sequence[str]) -> None:
    missing = [f for f in files if f not in archive.files]
    if missing:
        raise ValueError(f"{archive.path}: missing CIFAR binary files {missing}.")


def _cifar10(archive: _Archive) -> ImageSplits:
    train_files = [f"data_batch_{i}.bin" for i in range(1, 6)]
    _need(archive, [*train_files, "test_batch.bin", "batches.meta.txt"])
    classes = archive.lines("batches.meta.txt")
    parts = [_cifar_records(archive.read(f), 1, f) for f in train_files]
    train = ImageDataset(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1][:, 0] for p in parts]), classes
    )
    x, y = _cifar_records(archive.read("test_batch.bin"), 1, "test_batch.bin")
    return ImageSplits("cifar10", train, ImageDataset(x, y[:, 0], classes))


def _cifar100(archive: _Archive) -> ImageSplits:
    _need(archive, ["train.bin", "test.bin", "fine_label_names.txt", "coarse_label_names.txt"])
    fine, coarse = archive.lines("fine_label_names.txt"), archive.lines("coarse_label_names.txt")

    def split(name):
        x, y = _cifar_records(archive.read(name), 2, name)
        return ImageDataset(x, y[:, 1], fine, y[:, 0], coarse)

    return ImageSplits("cifar100", split("train.bin"), split("test.bin"))


# ----------------------------------------------------------------------------- folders, datasets


def _stack_images(arrays: Sequence[np.ndarray], sources: Sequence[str], where: str) -> np.ndarray:
    """Stacks HWC uint8/float images, refusing mixed sizes with the two offending sources."""
    if not arrays:
        raise ValueError(f"{where}: no images found.")
    first = arrays[0].shape
    for arr, src in zip(arrays, sources):
        if arr.shape != first:
            raise ValueError(
                f"{where}: images have mixed sizes: {sources[0]} is {first[1]}x{first[0]}x"
                f"{first[2]} (WxHxC) but {src} is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]}; "
                "resize them to one size first."
            )
    x = np.stack(arrays).astype(np.float32)
    return x / 255.0 if x.max() > 1.0 else x


def _pil_array(image) -> np.ndarray:
    arr = np.asarray(image.convert("L") if image.mode in ("1", "L", "I", "F") else
                     image.convert("RGB"))  # fmt: skip
    return arr[..., None] if arr.ndim == 2 else arr


def _read_class_folders(folder: Path, classes: tuple[str, ...] | None):
    from PIL import Image

    found = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    classes = classes or found
    arrays, labels, sources = [], [], []
    for label, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()) if (folder / name).is_dir() else []:
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    arrays.append(_pil_array(im))
                labels.append(label)
                sources.append(str(f))
    images = _stack_images(arrays, sources, str(folder))
    return images, np.asarray(labels, np.int32), classes


def load_image_folder(
    folder: str | os.PathLike, *, test_fraction: float = 0.25, seed: int = 0
) -> ImageSplits:
    """Images in class sub-folders: ``folder/train/<class>/*`` and ``folder/test/<class>/*``,
    or ``folder/<class>/*`` split by `test_fraction` (stratified).

    Raises:
      FileNotFoundError: no such folder.
      ValueError: no images, or images of different sizes (naming two of them).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist.")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        x, y, classes = _read_class_folders(folder / "train", None)
        tx, ty, _ = _read_class_folders(folder / "test", classes)
        return ImageSplits(folder.name, ImageDataset(x, y, classes), ImageDataset(tx, ty, classes))
    x, y, classes = _read_class_folders(folder, None)
    full = ImageDataset(x, y, classes)
    train, test = split_train_test(x, y, test_fraction, seed)
    return ImageSplits(folder.name, full.subset(train), full.subset(test))


def load_hf_images(
    name: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    test_split: str = "test",
    **load_kwargs,
) -> ImageSplits:
    """A Hugging Face `datasets` image-classification dataset (a hub name or a local path).

    Args:
      name: passed to ``datasets.load_dataset`` (e.g. "uoft-cs/cifar10", "imagefolder" with
        ``data_dir=``).
      image_column: the image column (default: the first `Image` feature).
      label_column: the label column (default: the first `ClassLabel` feature).
      test_split: the held-out split's name.
      **load_kwargs: more arguments for ``load_dataset``.

    Raises:
      ValueError: no image or label column, no train / test split, mixed image sizes.
    """
    import datasets

    ds = datasets.load_dataset(name, **load_kwargs)
    for split in ("train", test_split):
        if split not in ds:
            raise ValueError(f"{name}: no {split!r} split (it has {sorted(ds)}).")
    features = ds["train"].features
    image_column = image_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.Image)), None
    )
    label_column = label_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None
    )
    if image_column is None or label_column is None:
        raise ValueError(
            f"{name}: cannot tell the image and label columns apart among {sorted(features)}; "
            "pass image_column= and label_column=."
        )
    classes = tuple(features[label_column].names)

    def convert(split):
        rows = ds[split]
        arrays = [_pil_array(im) for im in rows[image_column]]
        sources = [f"{split}[{i}]" for i in range(len(arrays))]
        images = _stack_images(arrays, sources, name)
        return ImageDataset(images, np.asarray(rows[label_column], np.int32), classes)

    short = Path(str(load_kwargs.get("data_dir", name))).name
    return ImageSplits(short, convert("train"), convert(test_split))


def png_bytes(image: np.ndarray) -> bytes:
    """Encodes an HWC uint8 image as PNG (for writing test folders and notebooks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()
