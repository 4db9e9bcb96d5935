"""Small image classification sets for vit_sai.py, as uint8 tensors (N, C, H, W).

Fashion-MNIST and CIFAR-10 are found on disk or downloaded once into the cache. Offline, the
trainer still runs: load_images falls back to digits rendered from the fonts matplotlib ships.

    fashion_mnist: 60,000 train / 10,000 test, 1x28x28, 10 classes
    cifar10:       50,000 train / 10,000 test, 3x32x32, 10 classes (train with random_crop_flip)
    digits:        20,000 train / 4,000 test, 1x28x28, 10 classes (test fonts unseen in train)
"""
import dataclasses
import gzip
import math
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font

from data.files import CACHE_DIR, DownloadError, download

DATASETS = ("fashion_mnist", "cifar10", "digits")
CACHE_FOLDERS = {"fashion_mnist": "fashion-mnist", "cifar10": "cifar10"}  # under data_dir

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# file -> md5 of the upstream file, checked on download (Debian recompresses its copies);
# in the order load_images unpacks them
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # apt install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

DIGITS_TRAIN, DIGITS_TEST = 20000, 4000
# matplotlib's text fonts, which have the ten digits (not its symbol, display or fallback fonts):
# DejaVu Sans, Sans Mono and Serif, STIX, Computer Modern roman, sans, bold, typewriter, italic
DIGIT_FONTS = re.compile(r"(DejaVu(Sans|SansMono|Serif)(-\w+)?|STIXGeneral\w*"
                         r"|cm(r|ss|b|tt|ti)10)\.ttf")


@dataclass
class ImageData:
    train_x: torch.Tensor  # uint8, (N, C, H, W)
    train_y: torch.Tensor  # int64, (N,)
    test_x: torch.Tensor  # uint8, (M, C, H, W)
    test_y: torch.Tensor  # int64, (M,)
    classes: list[str]
    source: str  # 'fashion_mnist' | 'cifar10' | 'digits' (the offline fallback)
    augment: bool  # True for cifar10: the trainer applies random_crop_flip to train batches
    val_x: torch.Tensor | None = None  # uint8, held out of the training images (hold_out)
    val_y: torch.Tensor | None = None


def load_images(dataset, data_dir=CACHE_DIR, data_path="", log=print, seed=0):
    """`dataset` from data_path, the cache or a download; rendered digits if all of them fail."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown image dataset {dataset!r}: expected one of {DATASETS}")
    try:
        if dataset == "fashion_mnist":
            folder = find_fashion_mnist(data_dir, data_path, log)
            train_x, train_y, test_x, test_y = (
                torch.from_numpy(read_idx(os.path.join(folder, name)))
                for name in FASHION_MNIST_MD5)
            return ImageData(train_x[:, None], train_y.long(), test_x[:, None], test_y.long(),
                             FASHION_MNIST_CLASSES, "fashion_mnist", augment=False)
        if dataset == "cifar10":
            train_x, train_y, test_x, test_y, classes = read_cifar10(
                find_cifar10(data_dir, data_path, log))
            return ImageData(torch.from_numpy(train_x), torch.from_numpy(train_y),
                             torch.from_numpy(test_x), torch.from_numpy(test_y),
                             classes, "cifar10", augment=True)
    except DownloadError as e:
        apt = ", or apt install dataset-fashion-mnist" if dataset == "fashion_mnist" else ""
        log(f"{dataset} could not be found or downloaded ({e}); using the rendered-digits "
            f"fallback. For the real data pass --data_path=..., put the files in "
            f"{os.path.join(data_dir, CACHE_FOLDERS[dataset])}/{apt}")
    train_x, train_y, test_x, test_y = render_digits(DIGITS_TRAIN, DIGITS_TEST, seed)
    return ImageData(train_x, train_y, test_x, test_y, [str(d) for d in range(10)], "digits",
                     augment=False)


def hold_out(data, n_val, seed=0):
    """`data` with n_val of its training images, drawn by `seed`, moved to a validation split
    (val_x, val_y): the same images for every run (the seed is the split's, not the run's); the
    rest keep their order."""
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:].sort().values
    return dataclasses.replace(data, train_x=data.train_x[train], train_y=data.train_y[train],
                               val_x=data.train_x[val], val_y=data.train_y[val])


def find_fashion_mnist(data_dir, data_path, log):
    """The folder holding the four .gz files: data_path, the cache, Debian's, or a download."""
    if data_path:
        missing = [name for name in FASHION_MNIST_MD5
                   if not os.path.isfile(os.path.join(data_path, name))]
        if missing:
            raise FileNotFoundError(f"data_path {data_path!r} lacks Fashion-MNIST's {missing}")
        return data_path
    cache = os.path.join(data_dir, CACHE_FOLDERS["fashion_mnist"])
    for folder in (cache, FASHION_MNIST_SYSTEM_DIR):
        if all(os.path.isfile(os.path.join(folder, name)) for name in FASHION_MNIST_MD5):
            return folder
    for name, md5 in FASHION_MNIST_MD5.items():
        if not os.path.isfile(os.path.join(cache, name)):
            download(FASHION_MNIST_URL + name, os.path.join(cache, name), f"md5:{md5}", log)
    return cache


def find_cifar10(data_dir, data_path, log):
    """The path of cifar-10-python.tar.gz: data_path (file or folder), the cache, or a download."""
    if data_path:
        path = os.path.join(data_path, CIFAR10_FILE) if os.path.isdir(data_path) else data_path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data_path {data_path!r}: no {CIFAR10_FILE} there")
        return path
    path = os.path.join(data_dir, CACHE_FOLDERS["cifar10"], CIFAR10_FILE)
    if not os.path.isfile(path):
        download(CIFAR10_URL, path, f"md5:{CIFAR10_MD5}", log)
    return path


def read_idx(path):
    """An IDX file of uint8 (gzipped or plain): images (N, rows, cols) or labels (N,).

    Layout: two zero bytes, type code 0x08 (uint8), number of dims, then each dim as a
    big-endian uint32, then the data.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip ({e})") from e
    ndim = raw[3] if len(raw) > 3 else 0
    start = 4 + 4 * ndim  # where the data begins, after the dims
    if raw[:3] != b"\x00\x00\x08" or ndim not in (1, 3) or len(raw) < start:
        raise ValueError(f"{path}: not a uint8 IDX file of labels or images "
                         f"(header {raw[:start]!r})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - start != math.prod(dims):
        raise ValueError(f"{path}: {len(raw) - start} data bytes, expected "
                         f"{math.prod(dims)} for {dims} (truncated?)")
    # a copy owns writable memory, which torch.from_numpy needs to share it without a warning
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims).copy()


def read_cifar10(tar_path):
    """(train_x, train_y, test_x, test_y, classes) from cifar-10-python.tar.gz, read in memory.

    Each batch is a pickled dict: b'data' (N, 3072) uint8, the red plane then green then blue,
    each 32x32 row-major, so it reshapes straight to (N, 3, 32, 32); b'labels' a list of ints.
    """
    wanted = CIFAR10_BATCHES + ["batches.meta"]
    parts = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:  # in archive order: a gzip stream is slow to seek back in
            name = os.path.basename(member.name)
            if name in wanted:
                # pickle can run code from the file: the download is md5-checked, and a file
                # passed by hand is trusted like any other local input
                parts[name] = pickle.load(tar.extractfile(member), encoding="bytes")
    missing = [name for name in wanted if name not in parts]
    if missing:
        raise ValueError(f"{tar_path}: not a CIFAR-10 python archive, it lacks {missing}")
    classes = [label.decode() for label in parts["batches.meta"][b"label_names"]]

    def stack(names):
        x = np.concatenate([parts[name][b"data"] for name in names])
        y = np.concatenate([parts[name][b"labels"] for name in names])
        return x.reshape(-1, 3, 32, 32), y.astype(np.int64)

    return *stack(CIFAR10_BATCHES[:5]), *stack(CIFAR10_BATCHES[5:]), classes


def random_crop_flip(x, generator, padding=4):
    """Zero-pad by `padding`, take a random crop of the original size and flip half the images
    left-right: the standard CIFAR augmentation, one gather for the whole batch (B, C, H, W)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p), zeros
    # draw on the generator's device so a CPU generator drives GPU batches reproducibly too
    top, left = torch.randint(0, 2 * padding + 1, (2, B), generator=generator,
                              device=generator.device).to(x.device)
    flip = (torch.rand(B, generator=generator, device=generator.device) < 0.5).to(x.device)
    rows = top[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads columns backwards
    pixel = rows[:, :, None] * (W + 2 * padding) + cols[:, None, :]  # (B, H, W) into a flat plane
    crops = padded.flatten(2).gather(2, pixel.view(B, 1, H * W).expand(B, C, H * W))
    return crops.view(B, C, H, W)


def render_digits(n_train, n_test, seed, size=28):
    """(train_x, train_y, test_x, test_y): the digits 0-9 white on black like MNIST, uint8
    (N, 1, size, size) and int64 (N,), drawn from matplotlib's fonts under random affine maps,
    stroke width, contrast and pixel noise. A fifth of the fonts, picked by the seed, is kept
    for test, so the test set measures generalisation to unseen typefaces."""
    generator = torch.Generator().manual_seed(seed)
    glyphs = digit_glyphs(size)  # (fonts, 10, strokes, 2 * size, 2 * size)
    fonts = torch.randperm(len(glyphs), generator=generator)
    n_test_fonts = max(1, len(fonts) // 5)
    train_x, train_y = jitter_digits(glyphs[fonts[n_test_fonts:]], n_train, size, generator)
    test_x, test_y = jitter_digits(glyphs[fonts[:n_test_fonts]], n_test, size, generator)
    return train_x, train_y, test_x, test_y


def digit_glyphs(size):
    """Every digit of every font, scaled like MNIST to fit a box 20/28 of the canvas and
    centred, at two stroke widths: (fonts, 10, 2, 2 * size, 2 * size) float in [0, 1].
    Twice the output size, so that resampling down to `size` under jitter stays smooth."""
    font_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    names = sorted(name for name in os.listdir(font_dir) if DIGIT_FONTS.fullmatch(name))
    canvas = 2 * size
    box = round(canvas * 20 / 28)
    glyphs = torch.zeros(len(names), 10, canvas, canvas)
    for i, name in enumerate(names):
        font = FT2Font(os.path.join(font_dir, name))
        font.set_size(2 * box, 72)  # points at 72 dpi are pixels: render large, then shrink
        for digit in range(10):
            font.set_text(str(digit))
            font.draw_glyphs_to_bitmap()
            ink = torch.from_numpy(np.asarray(font.get_image(), dtype=np.float32) / 255)
            rows, cols = ink.sum(1).nonzero()[:, 0], ink.sum(0).nonzero()[:, 0]
            ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # the ink's bounding box
            h, w = (max(1, round(box * d / max(ink.shape))) for d in ink.shape)
            ink = F.interpolate(ink[None, None], (h, w), mode="bilinear", antialias=True)
            top, left = (canvas - h) // 2, (canvas - w) // 2
            glyphs[i, digit, top:top + h, left:left + w] = ink[0, 0]
    bold = F.max_pool2d(glyphs.view(-1, 1, canvas, canvas), 3, stride=1, padding=1)
    return torch.stack([glyphs, bold.view_as(glyphs)], dim=2)


def jitter_digits(glyphs, n, size, generator, chunk=4096):
    """n samples (classes balanced, order shuffled) of random glyphs under random affine maps,
    contrast and Gaussian pixel noise: uint8 (n, 1, size, size), int64 labels (n,)."""
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    labels = torch.randperm(n, generator=generator) % 10
    font = torch.randint(glyphs.shape[0], (n,), generator=generator)
    stroke = torch.randint(glyphs.shape[2], (n,), generator=generator)
    angle = uniform(-0.3, 0.3)  # radians, +-17 degrees
    shear = uniform(-0.3, 0.3)  # x leans by up to 0.3 y
    scale, aspect = uniform(0.8, 1.15), uniform(0.85, 1.15)  # size and width/height ratio
    shift = uniform(-0.15, 0.15, 2)  # in half-widths of the image: +-2 pixels at 28x28
    # theta maps each output pixel to the glyph position it reads, the inverse of what the
    # eye sees: dividing by `scale` draws the digit `scale` times larger
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones(n), torch.zeros(n)
    rotate = torch.stack([cos, -sin, sin, cos], 1).view(n, 2, 2)
    shear_map = torch.stack([one, shear, zero, one], 1).view(n, 2, 2)
    unscale = torch.diag_embed(torch.stack([1 / (scale * aspect), aspect / scale], 1))
    theta = torch.cat([unscale @ shear_map @ rotate, shift[:, :, None]], dim=2)  # (n, 2, 3)
    contrast, noise = uniform(0.6, 1.0, 1, 1, 1), uniform(0.0, 0.25, 1, 1, 1)

    x = torch.empty(n, 1, size, size)
    for i in range(0, n, chunk):  # bounds memory: each sample reads its own 2x-size glyph
        part = slice(i, i + chunk)
        picked = glyphs[font[part], labels[part], stroke[part]][:, None]  # (b, 1, 2s, 2s)
        grid = F.affine_grid(theta[part], [len(picked), 1, size, size], align_corners=False)
        x[part] = F.grid_sample(picked, grid, align_corners=False)
    x = x * contrast + noise * torch.randn(x.shape, generator=generator)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels
