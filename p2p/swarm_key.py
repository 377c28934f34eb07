"""Swarm key files for private swarms.

The file uses the text format of libp2p's `swarm.key` (as written by go-ipfs / ipfs-swarm-key-gen):

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex characters>

so researchers can keep one key file for their tools. The key itself is 32 random bytes. What we do with
it is our own gate (see `p2p.libp2p.gate`): a challenge/response proof bound to both peer ids, not
libp2p's pnet stream cipher.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

HEADER = "/key/swarm/psk/1.0.0/"
ENCODING = "/base16/"
KEY_SIZE = 32
_MAX_FILE = 4096


class SwarmKeyError(ValueError):
    """A swarm key file is missing, malformed, or would be overwritten."""


def format_key(key: bytes) -> str:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise SwarmKeyError(f"a swarm key is {KEY_SIZE} bytes")
    return f"{HEADER}\n{ENCODING}\n{key.hex()}\n"


def parse_key(text: str, source: str = "swarm key") -> bytes:
    """The 32-byte key in `text` (swarm.key format); SwarmKeyError says what is wrong."""
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != HEADER:
        first = lines[0][:60] if lines else ""
        raise SwarmKeyError(f"{source}: first line must be {HEADER!r}, found {first!r}; is this a swarm key file?")
    if len(lines) < 3:
        raise SwarmKeyError(f"{source}: expected 3 lines ({HEADER}, {ENCODING}, 64 hex characters), found {len(lines)}")
    if len(lines) > 3:
        raise SwarmKeyError(f"{source}: unexpected extra lines after the key")
    if lines[1] != ENCODING:
        raise SwarmKeyError(f"{source}: only the {ENCODING} encoding is supported, found {lines[1][:40]!r}")
    hex_key = lines[2]
    if len(hex_key) != 2 * KEY_SIZE:
        raise SwarmKeyError(f"{source}: the key must be {2 * KEY_SIZE} hex characters, found {len(hex_key)}")
    try:
        return bytes.fromhex(hex_key)
    except ValueError:
        raise SwarmKeyError(f"{source}: the key line is not hexadecimal") from None


def new_key_file(path: Path | str) -> bytes:
    """Write a fresh random key to `path` (mode 0600) and return it. Refuses to overwrite an existing file."""
    path = Path(path)
    key = secrets.token_bytes(KEY_SIZE)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SwarmKeyError(f"{path} already exists; refusing to overwrite a swarm key (move it away first)") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(format_key(key))
    return key


def load_key(path: Path | str) -> bytes:
    """Read a swarm key file; SwarmKeyError names the file and the defect."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise SwarmKeyError(f"swarm key file {path} does not exist (create one with `potluck swarm new-key`)") from None
    except OSError as e:
        raise SwarmKeyError(f"cannot read swarm key file {path}: {e.strerror or e}") from None
    return decode_key_file(raw, str(path))


def decode_key_file(raw: bytes, source: str) -> bytes:
    """The key in a swarm key file's bytes; SwarmKeyError names `source` and the defect."""
    if len(raw) > _MAX_FILE:
        raise SwarmKeyError(f"{source} is too large to be a swarm key file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SwarmKeyError(f"{source} is not a text swarm key file") from None
    return parse_key(text, source)
