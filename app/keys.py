"""API keys: bearer secrets stored only as SHA-256 hashes, each with a scope.

A keys file holds one key per line, ``<id> <scope> <sha256>``; ``#`` starts a comment.
``scaledl keys create --scope predict|admin`` appends a line and prints the secret once.
The scope ``admin`` includes ``predict``. ``SCALEDL_API_KEY`` adds one development key
with both scopes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import ConfigError, Forbidden, Unauthorized

Scope = Literal["predict", "admin"]
SCOPES: tuple[Scope, ...] = ("predict", "admin")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    if not path.is_file():
        raise ConfigError(
            f"API keys file {path} does not exist: create a key with "
            f"`scaledl keys create --scope predict`, or fix SCALEDL_API_KEYS_FILE"
        )
    keys: list[ApiKey] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{path}:{number}"
        if len(parts) != 3:
            raise ConfigError(f"{where}: expected `<id> <scope> <sha256>`, got {len(parts)} fields")
        key_id, scope, digest = parts
        if not _ID.match(key_id):
            raise ConfigError(f"{where}: key id {key_id!r} may use letters, digits, _ . - only")
        if scope not in SCOPES:
            raise ConfigError(f"{where}: scope {scope!r} is not one of {', '.join(SCOPES)}")
        if not _SHA256.match(digest):
            raise ConfigError(
                f"{where}: the third field must be the key's hex SHA-256 (64 characters), "
                "not the key itself"
            )
        if any(k.id == key_id for k in keys):
            raise ConfigError(f"{where}: key id {key_id!r} appears twice; ids must be unique")
        keys.append(ApiKey(id=key_id, scope=scope, sha256=digest))
    return keys


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


class KeyRing:
    """Answers "may this bearer secret use that scope?" with the key, 401 or 403."""

    def __init__(self, keys: list[ApiKey]) -> None:
        if not keys:
            raise ConfigError("no API keys: the API is never open; configure at least one")
        self._keys = list(keys)

    def authorize(self, secret: str | None, scope: Scope) -> ApiKey:
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
