"""CurveZMQ keys and the trust model's rules.

Task payloads are code: whoever can talk to a coordinator can run code on its workers.
So a coordinator binds loopback unless it has a CurveZMQ keypair and a directory of
authorised public keys, checked by a ZAP authenticator, or the user says ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth

from .errors import OdibiError


class SecurityError(OdibiError):
    """Keys are missing or unreadable, or an address would be exposed without them."""


SocketOptions = Callable[[zmq.Socket[Any]], None]


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create ``NAME.key`` (public, share it) and ``NAME.key_secret`` (keep it) in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public = d / f"{name}.key"
    secret = d / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise SecurityError(f"refusing to overwrite existing keys {public} / {secret}")
    pub, sec = zmq.auth.create_certificates(str(d), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


def _load(path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except Exception as exc:
        raise SecurityError(f"cannot read CurveZMQ key file {path}: {exc}") from None
    if want_secret and secret is None:
        raise SecurityError(f"{path} holds no secret key; pass the NAME.key_secret file")
    return public, secret


def client_socket_options(
    secret_file: str | None, server_key_file: str | None
) -> SocketOptions | None:
    """For workers and clients: authenticate with our keypair, verify the server's key."""
    if not secret_file and not server_key_file:
        return None
    if not (secret_file and server_key_file):
        raise SecurityError("CurveZMQ needs both a secret key file and the server's public key")
    public, secret = _load(secret_file, want_secret=True)
    server_public, _ = _load(server_key_file, want_secret=False)

    def apply(sock: zmq.Socket[Any]) -> None:
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_public

    return apply


def server_socket_options(secret_file: str) -> SocketOptions:
    public, secret = _load(secret_file, want_secret=True)

    def apply(sock: zmq.Socket[Any]) -> None:
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    return apply


def start_authenticator(ctx: zmq.asyncio.Context, authorized_dir: str) -> Any:
    """A ZAP handler accepting only clients whose public key is in ``authorized_dir``."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    if not os.path.isdir(authorized_dir):
        raise SecurityError(f"authorised keys directory not found: {authorized_dir}")
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=authorized_dir)
    return auth


def is_loopback(address: str) -> bool:
    """True for ipc:// and inproc:// and for tcp:// on a loopback host."""
    parts = urlsplit(address)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = parts.hostname or ""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False
