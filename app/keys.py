"""API keys: bearer secrets stored only as SHA-256 hashes, each with a scope.

A keys file holds one key per line, ``<id> <scope> <sha256>``; ``#`` starts a comment.
``scaledl keys create --scope predict|admin`` appends a line and prints the secret once;
``scaledl keys revoke <id>`` removes one. A serving ``KeyRing`` re-reads the file when it
changes, so neither needs a restart. The scope ``admin`` includes ``predict``.
``SCALEDL_API_KEY`` adds one development key with both scopes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import ConfigError, Forbidden, Unauthorized

Scope = Literal["predict", "admin"]
SCOPES: tuple[Scope, ...] = ("predict", "admin")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
log = logging.getLogger("ray.serve")


class ApiKey(BaseModel):
    """One key as stored: never the secret itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID.pattern, description="Who holds the key; shows in logs.")
    scope: Scope = Field(
        description="predict: inference routes; admin: everything (no route needs admin yet)."
    )
    sha256: str = Field(pattern=_SHA256.pattern, description="Hex SHA-256 of the secret.")

    def grants(self, scope: Scope) -> bool:
        return self.scope == "admin" or self.scope == scope


def key_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def dev_key(secret: str, key_id: str = "dev") -> ApiKey:
    """The single development key (SCALEDL_API_KEY, or one --dev generated): both scopes."""
    return ApiKey(id=key_id, scope="admin", sha256=key_sha256(secret))


def read_keys_file(path: Path) -> list[ApiKey]:
    """Every key in ``path``, or a ConfigError naming the line to fix."""
    return _parse(path, _read(path))


def _read(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(
            f"API keys file {path} does not exist: create a key with "
            f"`scaledl keys create --scope predict`, or fix SCALEDL_API_KEYS_FILE"
        )
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:  # gone since, unreadable, not text
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"API keys file {path} cannot be read: {why}") from None


def _parse(path: Path, text: str) -> list[ApiKey]:
    keys: list[ApiKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{path}:{number}"
        if len(parts) != 3:
            raise ConfigError(f"{where}: expected `<id> <scope> <sha256>`, got {len(parts)} fields")
        key_id, scope, digest = parts
        if not _ID.match(key_id):
            raise ConfigError(
                f"{where}: key id {_shown(key_id)} may use letters, digits, _ . - only (64 at most)"
            )
        if scope not in SCOPES:
            raise ConfigError(f"{where}: scope {_shown(scope)} is not one of {', '.join(SCOPES)}")
        if not _SHA256.match(digest):
            raise ConfigError(
                f"{where}: the third field must be the key's hex SHA-256 (64 characters), "
                "not the key itself"
            )
        if any(k.id == key_id for k in keys):
            raise ConfigError(f"{where}: key id {key_id!r} appears twice; ids must be unique")
        keys.append(ApiKey(id=key_id, scope=scope, sha256=digest))
    return keys


def _shown(field: str) -> str:
    """A field for an error message: a long one may be a secret pasted in the wrong place
    (the message reaches logs), so only its length is shown."""
    return repr(field) if len(field) <= 20 else f"({len(field)} characters)"


def create_key(path: Path, scope: Scope, key_id: str | None = None) -> tuple[ApiKey, str]:
    """Append a new key to ``path`` (created owner-only) and return it with its secret."""
    existing = read_keys_file(path) if path.is_file() else []
    key_id = key_id or f"{scope}-{secrets.token_hex(4)}"
    if not _ID.match(key_id):
        raise ConfigError(f"key id {key_id!r} may use letters, digits, _ . - only (64 at most)")
    if any(k.id == key_id for k in existing):
        raise ConfigError(f"{path} already holds a key {key_id!r}: pick another --id")
    secret = secrets.token_urlsafe(32)
    key = ApiKey(id=key_id, scope=scope, sha256=key_sha256(secret))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hand-edited file may lack its last newline: never glue the new key onto it.
    text = path.read_text() if path.is_file() else ""
    lead = "\n" if text and not text.endswith("\n") else ""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{lead}{key.id} {key.scope} {key.sha256}\n")
    return key, secret


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Remove the key ``key_id`` from ``path``, leaving every other line (comments too) as
    it was, and return it. The file is replaced in one step (a reader sees the old file or
    the new one, never half of it) and stays owner-only."""
    text = _read(path)
    keys = _parse(path, text)
    found = next((k for k in keys if k.id == key_id), None)
    if found is None:
        held = ", ".join(k.id for k in keys) or "none"
        raise ConfigError(
            f"{path} holds no key {key_id!r} (its keys: {held}); `scaledl keys list` shows the ids"
        )
    lines = text.splitlines(keepends=True)
    kept = [raw for raw in lines if raw.split("#", 1)[0].split()[:1] != [key_id]]
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return found


_Stamp = tuple[int, int, int]  # a file's inode, mtime (ns) and size: changes when it does


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class KeyRing:
    """Answers "may this bearer secret use that scope?" with the key, 401 or 403.

    ``keys`` are fixed (SCALEDL_API_KEY, a development key); ``file``, when given, is a
    keys file read now and re-read when it changes: `scaledl keys create` and `revoke`
    apply to a running service within ``poll_s`` seconds, without a restart. A file
    that breaks or disappears keeps the keys it last held, with one warning per change.
    """

    def __init__(
        self,
        keys: list[ApiKey],
        file: Path | str | None = None,
        *,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._static = list(keys)
        self._file = Path(file) if file is not None else None
        self._poll_s = poll_s
        self._clock = clock
        self._stamp: _Stamp | None = None
        file_keys: list[ApiKey] = []
        if self._file is not None:
            # Stamp before reading: a write that lands during the read is read next time.
            self._stamp = _stamp(self._file)
            file_keys = read_keys_file(self._file)
        self._checked_at = clock()
        self._keys = [*self._static, *file_keys]
        if not self._keys:
            raise ConfigError("no API keys: the API is never open; configure at least one")

    def authorize(self, secret: str | None, scope: Scope) -> ApiKey:
        self._refresh()
        if not secret:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        digest = key_sha256(secret)
        # Compare against every key, so timing does not tell which prefix matched.
        found = [k for k in self._keys if hmac.compare_digest(digest, k.sha256)]
        if not found:
            raise Unauthorized("API key not recognised: check the key you send")
        if not found[0].grants(scope):
            raise Forbidden(
                f"key {found[0].id!r} has scope {found[0].scope!r}; this needs {scope!r}"
            )
        return found[0]

    def _refresh(self) -> None:
        """Re-read the file if ``poll_s`` has passed and its stamp changed since."""
        if self._file is None:
            return
        now = self._clock()
        if now - self._checked_at < self._poll_s:
            return
        self._checked_at = now
        stamp = _stamp(self._file)
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a broken file is reported once, not on every request
        try:
            file_keys = read_keys_file(self._file)
        except ConfigError as exc:
            log.warning("API keys file change not applied (the keys before it still are): %s", exc)
            return
        self._keys = [*self._static, *file_keys]
        log.info("API keys file %s re-read: %d keys in force", self._file, len(self._keys))
        if not self._keys:
            log.warning("API keys file %s holds no key: every request is refused", self._file)
