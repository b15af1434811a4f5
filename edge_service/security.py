"""What the server needs to be safe to expose: TLS credentials, the auth
policy, and the rule that refuses to serve a network without them.

Everything here is read and checked before the model loads, so a wrong
path, a key that does not match its certificate, a broken token file or an
unprotected public address is a one-line error from ``edgeroute serve``, not
a server that starts and then fails every handshake.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from edge_service.auth import AuthPolicy, TokenFileError, TokenStore

if TYPE_CHECKING:  # pragma: no cover
    from edge_service.settings import EdgeSettings

log = logging.getLogger(__name__)

#: The largest certificate or key file read (a PEM chain is a few KiB).
MAX_PEM_BYTES = 1 << 20


class InsecureExposureError(ValueError):
    """A non-loopback address without TLS and authentication, and no ``--insecure``."""


def host_of(address: str) -> str:
    """The host part of ``host:port`` or ``[v6]:port``."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine.  Any name but
    ``localhost`` counts as reachable (it may resolve anywhere), and so do the
    wildcard addresses."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(address: str, settings: EdgeSettings) -> None:
    """Refuse a non-loopback address unless TLS and (tokens or mTLS) are on,
    or the operator said ``--insecure``; loopback stays open (demo, tests)."""
    host = host_of(address)
    if is_loopback_host(host):
        return
    if settings.tls and settings.authenticated:
        return
    if settings.insecure:
        log.warning(
            "serving %s without %s (--insecure): anyone who reaches the port can use, "
            "read and close every session", host or "all addresses",
            "authentication" if settings.tls else "TLS" if settings.authenticated else "TLS or authentication",
        )
        return
    raise InsecureExposureError(
        f"refusing to serve on {host or 'all addresses'} without TLS and authentication: "
        "give --tls-cert and --tls-key, and --auth-tokens or --tls-client-ca "
        "(or --insecure to serve without them)"
    )


def _read_pem(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"the {what} {path} is larger than {MAX_PEM_BYTES} bytes")
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {path} is not a PEM file")
    return data


def _check_pair(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Let OpenSSL parse the files now: a key that does not match its
    certificate would otherwise only show as failed handshakes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"--tls-cert {cert} and --tls-key {key} do not form a usable pair "
            f"(a certificate and its own private key, PEM): {getattr(exc, 'reason', None) or exc}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"--tls-client-ca {client_ca} is not a PEM CA certificate: {exc}") from None
    if key.stat().st_mode & 0o077:
        log.warning("the TLS key %s is readable by other users (chmod 600 it)", key)


@dataclass(frozen=True)
class ServerSecurity:
    """The server's TLS credentials (None: plaintext) and who may call it."""

    credentials: grpc.ServerCredentials | None
    policy: AuthPolicy

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> "ServerSecurity":
        """Read and check every file named in ``settings``; ``ValueError`` with
        one line naming the flag otherwise."""
        credentials = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            cert = _read_pem(settings.tls_cert, "TLS certificate")
            key = _read_pem(settings.tls_key, "TLS key")
            ca = _read_pem(settings.tls_client_ca, "client CA") if settings.tls_client_ca else None
            _check_pair(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
        tokens = TokenStore(settings.auth_tokens) if settings.auth_tokens is not None else None
        return cls(credentials, AuthPolicy(tokens=tokens, mtls=settings.tls_client_ca is not None))

    def reload_tokens(self) -> int:
        """Re-read the token file (SIGHUP): the number of principals now in
        force.  On a bad file the old principals stay and ``TokenFileError``
        says why; sessions are never touched (a rotated token keeps its
        principal's sessions, a removed principal's calls are refused)."""
        if self.policy.tokens is None:
            raise TokenFileError("this server has no --auth-tokens file to reload")
        return self.policy.tokens.reload()
