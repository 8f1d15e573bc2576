"""Image data: digits, CIFAR binary archives (synthetic, official layout), folders, errors."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from jaxunlearn.data import images as im


def test_digits_are_sklearns_images_scaled_and_split():
    from sklearn.datasets import load_digits

    ref = load_digits()
    splits = im.load_digits(test_fraction=0.25, seed=0)
    assert splits.train.images.shape[1:] == (8, 8, 1)
    assert len(splits.train) + len(splits.test) == len(ref.target)
    # every image is one of sklearn's, scaled by 1/16, with its own label
    flat_ref = {
        row.tobytes(): t for row, t in zip((ref.images / 16.0).astype(np.float32), ref.target)
    }
    for x, y in zip(splits.test.images[:50, ..., 0], splits.test.labels[:50]):
        assert flat_ref[x.tobytes()] == y
    # stratified: each class's share of the test set is close to 25%
    for c in range(10):
        share = (splits.test.labels == c).sum() / (ref.target == c).sum()
        assert abs(share - 0.25) < 0.02
    np.testing.assert_array_equal(splits.train.coarse_labels, splits.train.labels // 2)
    assert splits.train.coarse_names[1] == "2-3"


def _record(labels, image):
    """One official CIFAR binary record: label byte(s), then the R, G and B planes."""
    return bytes(labels) + image.transpose(2, 0, 1).tobytes()


def _tar(path, folder, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar10_binary_archive(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=12)
    files = {
        f"data_batch_{i}.bin": b"".join(
            _record([labels[j]], imgs[j]) for j in (2 * i - 2, 2 * i - 1)
        )
        for i in range(1, 6)
    }
    files["test_batch.bin"] = b"".join(_record([labels[j]], imgs[j]) for j in (10, 11))
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    files["batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
    _tar(tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin", files)
    splits = im.load_cifar(tmp_path / "cifar-10-binary.tar.gz")
    assert splits.name == "cifar10" and splits.train.class_names == tuple(names)
    np.testing.assert_array_equal(splits.train.images, imgs[:10].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(splits.train.labels, labels[:10])
    np.testing.assert_array_equal(splits.test.images, imgs[10:].astype(np.float32) / 255.0)
    # truncated file: named, with what to do
    files["data_batch_3.bin"] = files["data_batch_3.bin"][:-5]
    _tar(tmp_path / "bad.tar.gz", "cifar-10-batches-bin", files)
    with pytest.raises(ValueError, match="data_batch_3.bin.*truncated"):
        im.load_cifar(tmp_path / "bad.tar.gz")


def test_cifar100_binary_folder_with_superclasses(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    fine, coarse = [3, 99, 0, 51, 69], [7, 19, 4, 10, 19]
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    rec = [_record([c, f], x) for c, f, x in zip(coarse, fine, imgs)]
    (folder / "train.bin").write_bytes(b"".join(rec[:3]))
    (folder / "test.bin").write_bytes(b"".join(rec[3:]))
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)))
    (folder / "coarse_label_names.txt").write_text("\n".join(f"coarse{i}" for i in range(20)))
    splits = im.load_cifar(folder)
    assert splits.name == "cifar100"
    np.testing.assert_array_equal(splits.train.labels, fine[:3])
    np.testing.assert_array_equal(splits.test.coarse_labels, coarse[3:])
    np.testing.assert_array_equal(splits.test.images[1], imgs[4] / np.float32(255.0))
    assert splits.train.with_coarse_labels().class_names[19] == "coarse19"


def test_cifar_pickle_version_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "batches.meta", "test_batch"):
        (folder / name).write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle.*binary version"):
        im.load_cifar(folder)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_and_mixed_sizes(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for i in range(3):
                a = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
                arrays[(split, cls, i)] = a
                _write_png(tmp_path / "pets" / split / cls / f"{i}.png", a)
    splits = im.load_image_folder(tmp_path / "pets")
    assert splits.train.class_names == ("cat", "dog")
    np.testing.assert_array_equal(splits.test.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(splits.test.images[4], arrays[("test", "dog", 1)] / 255.0)
    _write_png(tmp_path / "pets" / "train" / "dog" / "big.png", np.zeros((7, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="mixed sizes.*big.png"):
        im.load_image_folder(tmp_path / "pets")


def test_hf_imagefolder_dataset(tmp_path):
    pytest.importorskip("datasets")
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(2):
                a = rng.integers(0, 256, size=(4, 4), dtype=np.uint8)
                _write_png(tmp_path / "tiny" / split / cls / f"{i}.png", a)
    splits = im.load_hf_images("imagefolder", data_dir=str(tmp_path / "tiny"))
    assert splits.train.images.shape == (4, 4, 4, 1)
    assert sorted(splits.test.labels.tolist()) == [0, 0, 1, 1]


def test_forget_class_that_does_not_exist():
    data = im.load_digits().train
    assert im.class_index(data, "7") == 7 and im.class_index(data, 3) == 3
    with pytest.raises(ValueError, match="forget class 12 does not exist.*0 to 9"):
        im.class_index(data, 12)
    with pytest.raises(ValueError, match="'rocket' does not exist"):
        im.class_index(data, "rocket")


def test_vision_modules_do_not_import_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, jaxunlearn.checkpoints.vision, jaxunlearn.classifiers, "
        "jaxunlearn.data.images, jaxunlearn.models.vision, jaxunlearn.pipeline.classifiers\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    repo = Path(__file__).parent.parent
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
