"""The agent's credentials: an ed25519 host key and a random access token.

One JSON file holds both. The agent creates it at first start (mode 0600) and reuses
it afterwards; in a cluster it comes from the Secret the injection created. A client
needs only the public host key (to pin it) and the token, so a file without the private
key is a valid client credential.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


from intercept.errors import CredentialsError


@dataclass(frozen=True)
class Credentials:
    token: str
    host_public_key: str  # OpenSSH one-line form, "ssh-ed25519 AAAA..."
    host_private_key: str | None = None  # OpenSSH PEM; only the agent needs it

    def to_json(self, *, private: bool = True) -> str:
        data = {"token": self.token, "host_public_key": self.host_public_key}
        if private and self.host_private_key:
            data["host_private_key"] = self.host_private_key
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def generate(cls) -> Credentials:
        import asyncssh  # here, not at the top: an agent that reads its credentials never loads it before a developer comes

        key = asyncssh.generate_private_key("ssh-ed25519")
        return cls(
            token=secrets.token_urlsafe(32),
            host_public_key=key.export_public_key().decode().strip(),
            host_private_key=key.export_private_key().decode(),
        )


def load(path: str | os.PathLike[str]) -> Credentials:
    """Read a credentials file; raises :class:`CredentialsError` naming the file and the fix."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        return Credentials(data["token"], data["host_public_key"], data.get("host_private_key"))
    except FileNotFoundError:
        raise CredentialsError(
            f"credentials file {p} does not exist; pass the file the agent wrote (--credentials)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CredentialsError(
            f"credentials file {p} is unreadable ({e.__class__.__name__}: {e}); "
            "pass the JSON file the agent wrote, or delete it to let the agent create a new one"
        ) from None


def load_or_create(path: str | os.PathLike[str]) -> Credentials:
    """The agent's start: reuse the file when it exists, else create it with mode 0600."""
    p = Path(path)
    if p.exists():
        creds = load(p)
        if not creds.host_private_key:
            raise CredentialsError(f"credentials file {p} has no host_private_key; the agent needs the full file")
        return creds
    creds = Credentials.generate()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:  # a read-only root, or a Secret that is not mounted: not a port problem
        raise CredentialsError(
            f"credentials file {p} does not exist and cannot be created ({e.strerror or e}); in a pod the agent "
            "reads it from the Secret the injection mounts (is the Secret missing?), elsewhere pass "
            "--credentials a path in a writable directory"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(creds.to_json())
    return creds
