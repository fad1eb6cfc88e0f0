"""Pre-shared keys: make them, write them safely, read them back strictly.

A key is 32 random bytes, stored as one line of base64 text in a file that
only its owner may read or write (mode 0600); a raw 32-byte file is accepted
too. Invariants: key files are created with mode 0600 from the start (never
chmod-ed after writing), never overwritten, and refused when group or other
may read or write them. No key material ever appears in a message, an
exception or a log line: errors name the file and the problem only.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import stat
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

KEY_SIZE = 32

# A key file is 32 raw bytes or about 45 bytes of base64; anything much
# larger is the wrong file, and is not read whole.
_MAX_KEY_FILE = 4096


def generate_key() -> bytes:
    """A new key: KEY_SIZE bytes from the OS's cryptographic random source."""
    return secrets.token_bytes(KEY_SIZE)


def key_text(key: bytes) -> str:
    """How `key` is written to a key file: base64 and a newline."""
    return base64.b64encode(key).decode("ascii") + "\n"


def write_key_file(path: str | Path | None) -> str | None:
    """Generate a new key and store it in a new file at `path` (mode 0600).

    With `path` None, return the key file's text instead (for stdout) and
    write nothing. Refuses (UserError) to overwrite an existing file.
    """
    text = key_text(generate_key())
    if path is None:
        return text
    try:
        # O_EXCL: never follow a planted symlink or replace an existing key;
        # 0o600 at creation: the key is never readable by others, not even
        # for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UserError(f"key file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise UserError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        os.unlink(path)
        raise UserError(f"cannot write key file {path}: {exc.strerror}") from None
    log.info("wrote new key file %s", path)
    return None


def load_key(path: str | Path) -> bytes:
    """The key stored in `path`: base64 text (as `write_key_file` writes it)
    or exactly KEY_SIZE raw bytes. Raises UserError when the file is missing,
    unreadable, not a regular file, readable or writable by group/other, or
    does not hold a KEY_SIZE-byte key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"key file {path} not found (create one with 'dstfuse keygen')") from None
    except OSError as exc:
        raise UserError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        # fstat on the open file: the mode checked is that of the file read.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"key file {path} is not a regular file")
        _check_mode(path, stat.S_IMODE(info.st_mode))
        content = _read_at_most(fd, _MAX_KEY_FILE + 1, path)
    finally:
        os.close(fd)
    key = _decode(content)
    if key is None:
        raise UserError(
            f"key file {path} does not hold a {KEY_SIZE}-byte key "
            "(expected base64 text as written by 'dstfuse keygen')"
        )
    return key


def _read_at_most(fd: int, limit: int, path: str | Path) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    try:
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise UserError(f"cannot read key file {path}: {exc.strerror}") from None
    return b"".join(chunks)


def _check_mode(path: str | Path, mode: int) -> None:
    if mode & 0o044:
        problem = "readable"
    elif mode & 0o022:
        problem = "writable"
    else:
        return
    raise UserError(f"key file {path} is {problem} by group/other (mode {mode:04o}); chmod 600 it")


def _decode(content: bytes) -> bytes | None:
    """The key in `content`, or None. Raw bytes are tried first: base64 of a
    32-byte key is 44 characters, so the two forms cannot be confused."""
    if len(content) == KEY_SIZE:
        return content
    if len(content) > _MAX_KEY_FILE:
        return None
    try:
        key = base64.b64decode(content.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == KEY_SIZE else None
