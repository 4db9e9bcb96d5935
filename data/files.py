"""Cache files that are never half-written: atomic replace, and downloads checked by hash."""
import hashlib
import http.client
import os
import shutil
import urllib.request
from contextlib import contextmanager

# Downloads and prepared data live beside the code (data/cache/), wherever a script is started.
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
DOWNLOAD_TIMEOUT_S = 15  # per socket operation: offline fails fast, a slow mirror still finishes


class DownloadError(Exception):
    """The file could not be fetched (offline, HTTP error, or wrong bytes)."""


@contextmanager
def atomic_path(path):
    """Yield a temp file name next to `path`; it becomes `path` only if the block finishes.

    Killed or failed halfway (Ctrl-C included), `path` keeps its old state and the temp is removed,
    so a reader never sees a half-written cache file.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # the pid keeps two processes filling one cache apart
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(url, path, checksum="", log=print):
    """Fetch `url` into `path`, checked against `checksum` ("sha256:<hex>" or "md5:<hex>").

    Raises DownloadError on any network failure or checksum mismatch; `path` is then untouched.
    """
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            # logged only once the server answered, so an offline run stays quiet here
            log(f"downloading {url} -> {path}")
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f)
                if checksum:
                    algorithm, expected = checksum.split(":")
                    with open(tmp, "rb") as f:
                        actual = hashlib.file_digest(f, algorithm).hexdigest()
                    if actual != expected:
                        raise DownloadError(f"{url}: {algorithm} {actual}, expected {expected}")
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, dropped connections
        raise DownloadError(f"{url}: {e}") from e
