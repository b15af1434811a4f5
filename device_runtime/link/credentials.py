"""How the device proves who it is to the edge, and checks the edge: TLS, mTLS, bearer tokens.

``ChannelSecurity`` is built from ``--tls``, ``--tls-ca``, ``--tls-cert``/``--tls-key``
and ``--token-file`` (or the ``EDGEROUTE_TOKEN`` environment variable, read by
the CLI, never here) and turns into gRPC channel credentials.  The token
travels as ``authorization: Bearer <token>`` call metadata, which gRPC only
sends over TLS; a token without TLS is refused unless the target is loopback
(the demo and the tests), where it is sent as plain metadata.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.core.flags import flag

#: The largest certificate, key or token file read (a PEM chain is a few KiB).
MAX_CREDENTIAL_FILE_BYTES = 1 << 20
ENV_TOKEN = "EDGEROUTE_TOKEN"


class CredentialsError(ValueError):
    """A credentials file cannot be read, or the combination makes no sense."""


def read_credential_file(path: str | Path, what: str) -> bytes:
    p = Path(path).expanduser()
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_CREDENTIAL_FILE_BYTES + 1)
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(data) > MAX_CREDENTIAL_FILE_BYTES:
        raise CredentialsError(f"{what} {p} is larger than {MAX_CREDENTIAL_FILE_BYTES} bytes")
    if not data.strip():
        raise CredentialsError(f"{what} {p} is empty")
    return data


def read_token(path: str | Path) -> str:
    """The bearer token in ``path``: its first non-empty line."""
    raw = read_credential_file(path, "token file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"token file {path} is not UTF-8 text") from None
    return check_token(next((line.strip() for line in text.splitlines() if line.strip()), ""), str(path))


def check_token(token: str, source: str = "token") -> str:
    token = token.strip()
    if not token or len(token) > 512 or any(c.isspace() or not c.isprintable() for c in token):
        raise CredentialsError(f"{source}: a token is one line of printable characters without spaces")
    return token


def is_loopback(target: str) -> bool:
    """``target`` (``host:port``) names this machine: localhost or a loopback address."""
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ChannelSecurity:
    """What the client does to secure its channel to the edge."""

    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise CredentialsError("--tls-cert and --tls-key go together (mTLS)")
        if self.ca_file is not None or self.cert_file is not None:
            object.__setattr__(self, "tls", True)
        if self.token is not None:
            object.__setattr__(self, "token", check_token(self.token))

    def check_files(self) -> None:
        """Read and parse the CA, certificate and key now, so that a wrong file
        is one clear error before anything connects (gRPC would only fail the
        handshake later, with a message about the connection)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file is not None:
            pem = read_credential_file(self.ca_file, "CA file")
            try:
                ctx.load_verify_locations(cadata=pem.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError):
                raise CredentialsError(f"CA file {self.ca_file} holds no PEM certificate") from None
        if self.cert_file is not None and self.key_file is not None:
            read_credential_file(self.cert_file, "client certificate")
            read_credential_file(self.key_file, "client key")
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
            except CredentialsError:
                raise
            except (ssl.SSLError, ValueError, OSError) as exc:
                raise CredentialsError(
                    f"client certificate {self.cert_file} and key {self.key_file} are not a PEM "
                    f"certificate and its unencrypted private key ({getattr(exc, 'reason', None) or exc})"
                ) from None

    def channel_credentials(self):
        """``grpc.ChannelCredentials`` for TLS (system roots unless a CA is given), or None."""
        if not self.tls:
            return None
        import grpc

        self.check_files()
        return grpc.ssl_channel_credentials(
            root_certificates=read_credential_file(self.ca_file, "CA file") if self.ca_file else None,
            private_key=read_credential_file(self.key_file, "client key") if self.key_file else None,
            certificate_chain=read_credential_file(self.cert_file, "client certificate") if self.cert_file else None,
        )

    def metadata(self, target: str) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, if any (TLS, or a loopback target)."""
        if self.token is None:
            return ()
        if not self.tls and not is_loopback(target):
            raise CredentialsError(
                f"refusing to send the token to {target} in clear text: use --tls (and --tls-ca)"
            )
        return (("authorization", f"Bearer {self.token}"),)


def _no_password() -> bytes:
    raise CredentialsError("the client key is encrypted: give an unencrypted key (keep it mode 600)")


@dataclass(frozen=True)
class EdgeSecuritySettings:
    """How ``chat``, ``demo --edge`` and ``profile`` secure their link to the
    edge; each field is a flag.  The token may also come from the
    ``EDGEROUTE_TOKEN`` environment variable, which the command reads and hands
    to :meth:`channel_security` (the library never reads the environment)."""

    tls: bool = field(default=False, metadata=flag(
        "connect to the edge over TLS, trusting the system CA roots (implied by --tls-ca and --tls-cert)"
    ))
    tls_ca: Path | None = field(default=None, metadata=flag(
        "trust this CA (PEM) for the edge's certificate", metavar="FILE", type=Path,
    ))
    tls_cert: Path | None = field(default=None, metadata=flag(
        "client certificate (PEM) for mTLS, with --tls-key", metavar="FILE", type=Path,
    ))
    tls_key: Path | None = field(default=None, metadata=flag(
        "the client certificate's unencrypted private key (PEM)", metavar="FILE", type=Path,
    ))
    token_file: Path | None = field(default=None, metadata=flag(
        f"file whose first line is the bearer token (default: the {ENV_TOKEN} environment variable)",
        metavar="FILE", type=Path,
    ))

    @property
    def given(self) -> bool:
        """Whether any of these flags was given."""
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key or self.token_file)

    def channel_security(self, env_token: str | None = None) -> ChannelSecurity:
        """The checked :class:`ChannelSecurity`: every file read and parsed now,
        so a bad one is a :class:`CredentialsError` before any model loads.
        ``env_token``: the ``EDGEROUTE_TOKEN`` value, used without ``--token-file``."""
        if self.token_file is not None:
            token = read_token(self.token_file)
        elif env_token is not None and env_token.strip():
            token = check_token(env_token, ENV_TOKEN)
        else:
            token = None
        security = ChannelSecurity(
            tls=self.tls, ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key, token=token,
        )
        security.check_files()
        return security
