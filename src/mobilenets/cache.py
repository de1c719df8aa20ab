"""The one cache folder: downloads, converted weights, measured backend choices, benchmark grids.

``$MOBILENETS_CACHE`` if set, else ``$XDG_CACHE_HOME/mobilenets``, else
``~/.cache/mobilenets`` (the XDG default), so it lives where the user's other
caches live.

Entries that a later run would act on without checking (int8 preparations, built runtime graphs) follow a
trust model like ssh's for its keys: their folder must be the user's and writable by no one else, else it is
not used; each entry carries an HMAC, under a secret kept in the folder (``.key``, 0600), of its key (the
file name) and its bytes, so an entry edited, or copied from another key or another machine, fails the check
and is made afresh.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import warnings
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here: writers create what they write)."""
    if os.environ.get("MOBILENETS_CACHE"):
        return Path(os.environ["MOBILENETS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mobilenets"


def trusted_secret(folder: Path, what: str, instead: str, *, stacklevel: int = 4) -> bytes | None:
    """The folder's secret, made on first use; None (after a warning naming ``what`` cache and what happens
    ``instead``) where the folder cannot be trusted."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _untrusted(folder)
        key = folder / ".key"
        if why is None:
            try:
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
            st = key.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                why = f"its key {key} is readable or writable by others, or not yours"
    except OSError as e:
        why = f"it cannot be used ({e.strerror or e})"
    if why is None:
        secret = key.read_bytes()
        if len(secret) == 32:
            return secret
        why = f"its key {key} is damaged (delete it to start afresh)"
    warnings.warn(f"not using the {what} cache {folder}: {why}; {instead}", stacklevel=stacklevel)
    return None


def _untrusted(folder: Path) -> str | None:
    st = folder.stat()
    if st.st_uid != os.getuid():
        return f"it belongs to user id {st.st_uid}, not to you"
    if st.st_mode & 0o022:
        return "others may write to it (chmod go-w fixes that)"
    return None


def signature(secret: bytes, name: str, data: bytes) -> str:
    """The HMAC-SHA256 (hex) of an entry called ``name`` holding ``data``."""
    return hmac.new(secret, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def signed(secret: bytes, path: Path) -> bool:
    """Whether ``path`` matches the signature recorded beside it (``path.sig``)."""
    try:
        recorded = path.with_suffix(".sig").read_text().strip()
        data = path.read_bytes()
    except (OSError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(recorded, signature(secret, path.name, data))


@functools.cache
def code_sha256() -> str:
    """Of every source file of this package: a changed mobilenets makes its cache entries anew rather than
    trust old results."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
