"""Sealing what the store keeps of a run's request and answer with the `store_key`.

The cipher is AES-256-GCM (the `cryptography` package): authenticated, so a changed value is
refused rather than decrypted into garbage. Each value gets its own random 96-bit nonce. A
sealed value is laid out as

    version (1 byte, 0x01) | nonce (12 bytes) | ciphertext | tag (16 bytes)

so it is 29 bytes longer than the plain one. The associated data is the run id and the column,
so a value copied into another run, or into another field of the same run, does not open: the
store refuses to read that run instead of replaying someone else's request.

The store keeps a check value (a fixed text, sealed) beside the runs. A gateway started with
another key finds that it does not open and stops before it serves anything.

Errors::

    StoreError
    └── StoreKeyError     the store_key does not open this store, or the store needs one
    └── SealBroken        a stored value does not open (changed, moved, or another key)
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import StoreError

__all__ = ["KEY_CHECK", "SealBroken", "Sealer", "StoreKeyError"]

_VERSION: Final = b"\x01"
_NONCE: Final = 12
_TAG: Final = 16
_AD_PREFIX: Final = b"stepgate/v1\x00"
_CHECK_TEXT: Final = b"stepgate store key check"
# The name the check value is kept under (a `meta` row).
KEY_CHECK: Final = "store_key_check"


class StoreKeyError(StoreError):
    """The configured `store_key` does not open this store, or the store needs one."""


class SealBroken(StoreError):
    """A sealed value did not open: it was changed, moved to another run, or sealed with
    another key."""

    def __init__(self, run_id: str, column: str) -> None:
        super().__init__(f"the stored {column} of run {run_id} does not open with the store_key")
        self.run_id = run_id
        self.column = column


def _associated(run_id: str, column: str) -> bytes:
    return b"".join((_AD_PREFIX, run_id.encode(), b"\x00", column.encode()))


class Sealer:
    """Seals and opens values with one key (32 bytes)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, run_id: str, column: str, plain: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return b"".join(
            (_VERSION, nonce, self._aead.encrypt(nonce, plain, _associated(run_id, column)))
        )

    def open(self, run_id: str, column: str, sealed: bytes) -> bytes:
        if len(sealed) < 1 + _NONCE + _TAG or sealed[:1] != _VERSION:
            raise SealBroken(run_id, column)
        # A view, not a slice: copying a large value first costs more than opening it.
        view = memoryview(sealed)
        nonce, ciphertext = view[1 : 1 + _NONCE], view[1 + _NONCE :]
        try:
            return self._aead.decrypt(nonce, ciphertext, _associated(run_id, column))
        except InvalidTag:
            raise SealBroken(run_id, column) from None

    def check_value(self) -> bytes:
        """What the store keeps to recognise this key later."""
        return self.seal("", KEY_CHECK, _CHECK_TEXT)

    def matches(self, check: bytes) -> bool:
        try:
            return self.open("", KEY_CHECK, check) == _CHECK_TEXT
        except SealBroken:
            return False
