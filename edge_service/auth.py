"""Who is calling: bearer tokens, mTLS subjects, and the audit log.

A token file holds one ``principal<TAB>sha256-hex-of-token`` per line (blank
lines and ``#`` comments allowed), so the file never holds a usable token;
``edgeroute token new NAME`` makes a token and its line.  Clients send
``authorization: Bearer <token>``.  With a client CA (mTLS), a verified
client certificate's subject is a principal too.

:class:`AuthInterceptor` is the outermost interceptor: every EdgeLLM call is
authenticated before any handler work (``UNAUTHENTICATED`` otherwise), the
principal is put where the servicer reads it (:func:`current_principal`), and
one structured audit line is logged per call.  Health stays open for load
balancers; reflection is served only when the operator asks for it, and then
needs auth too when auth is on.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import grpc

log = logging.getLogger(__name__)
audit_log = logging.getLogger("edgeroute.audit")

#: Methods that never need a principal: health checks for load balancers.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: The principal of every call when the server runs without auth (loopback).
ANONYMOUS = "anonymous"
#: Longest principal name; also the cap on names shown in logs.
MAX_PRINCIPAL_CHARS = 128
#: Longest client-supplied string copied into a log line or a status detail.
MAX_ECHOED_CHARS = 96
TOKEN_BYTES = 32  # 256 bits; the issue asks for at least 128

_PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9._@:/=+\-]{1,%d}$" % MAX_PRINCIPAL_CHARS)
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("edgeroute_principal", default=ANONYMOUS)


class TokenFileError(ValueError):
    """The token file cannot be read or holds a malformed line."""


def cap(text: object, limit: int = MAX_ECHOED_CHARS) -> str:
    """``text`` as a string of at most ``limit`` characters, for logs and details."""
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def short_hash(value: str) -> str:
    """A 12-hex-digit SHA-256 prefix: enough to follow a session through the
    audit log without writing its id there."""
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:12] if value else "-"


def hash_token(token: str) -> str:
    """What the token file stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def check_principal(name: str) -> str:
    if not _PRINCIPAL_RE.match(name):
        raise ValueError(
            f"principal {cap(name)!r} must be 1-{MAX_PRINCIPAL_CHARS} characters of "
            "letters, digits and ._@:/=+-"
        )
    return name


def parse_token_file(text: str, source: str = "token file") -> dict[str, str]:
    """``sha256 hex -> principal`` from the file's text; a bad line is an error
    naming its number (never its content, which might be a pasted token)."""
    by_digest: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise TokenFileError(f"{source}:{lineno}: expected 'principal<TAB>sha256-hex'")
        name, digest = parts[0].strip(), parts[1].strip().lower()
        try:
            check_principal(name)
        except ValueError as exc:
            raise TokenFileError(f"{source}:{lineno}: {exc}") from None
        if not _HEX_RE.match(digest):
            raise TokenFileError(f"{source}:{lineno}: the second field must be 64 hex digits (a SHA-256)")
        if digest in by_digest:
            raise TokenFileError(f"{source}:{lineno}: the same token hash is listed twice")
        by_digest[digest] = name
    return by_digest


class TokenStore:
    """The principals of a token file; :meth:`reload` re-reads it (SIGHUP)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._by_digest: dict[str, bytes] = {}
        self._names: dict[str, str] = {}
        self.reload()

    def reload(self) -> int:
        """Read the file again; on error the old principals stay in force.
        Returns the number of principals."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"cannot read token file {self.path}: {exc}") from None
        table = parse_token_file(text, str(self.path))
        with self._lock:
            self._names = dict(table)
            self._by_digest = {d: bytes.fromhex(d) for d in table}
        return len(set(table.values()))

    def principal_for(self, token: str) -> str | None:
        """The principal whose hash matches ``token``, compared in constant time
        against every entry (the time does not depend on which entry, if any, matches)."""
        presented = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        with self._lock:
            entries = list(self._by_digest.items())
            names = self._names
        found = None
        for hex_digest, digest in entries:
            if hmac.compare_digest(presented, digest):
                found = names[hex_digest]
        return found


def bearer_token(metadata: Any) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry, ``None`` if
    there is none; raises ``ValueError`` on a malformed or repeated one."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("more than one authorization header")
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512 or any(c.isspace() for c in token):
        raise ValueError("malformed authorization header (expected 'Bearer <token>')")
    return token


def certificate_subject(auth_context: Mapping[str, Any] | None) -> str | None:
    """The verified client certificate's subject (``x509_subject``; the common
    name if grpc reports only that), or ``None`` without one."""
    ctx = auth_context or {}
    for key in ("x509_subject", "x509_common_name"):
        values = ctx.get(key) or []
        if values:
            raw = values[0]
            return cap(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw), MAX_PRINCIPAL_CHARS)
    return None


def current_principal() -> str:
    """The principal of the call being handled (``anonymous`` without auth)."""
    return _current.get()


@dataclass(frozen=True)
class AuthPolicy:
    """How calls are authenticated: by token, by client certificate, or not at all."""

    tokens: TokenStore | None = None
    mtls: bool = False

    @property
    def required(self) -> bool:
        return self.tokens is not None or self.mtls

    def authenticate(self, metadata: Any, auth_context: Mapping[str, Any] | None) -> str:
        """The caller's principal; raises ``PermissionError`` with a reason
        that never contains the token."""
        if not self.required:
            return ANONYMOUS
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise PermissionError(str(exc)) from None
        if token is not None:
            if self.tokens is None:
                raise PermissionError("this server does not accept bearer tokens")
            name = self.tokens.principal_for(token)
            if name is None:
                raise PermissionError("unknown token")
            return name
        subject = certificate_subject(auth_context) if self.mtls else None
        if subject is not None:
            return "cert:" + subject
        raise PermissionError("no credentials (send 'authorization: Bearer <token>')")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health, and writes the audit line."""

    def __init__(
        self,
        policy: AuthPolicy,
        *,
        session_of: Callable[[Any], str] | None = None,
        on_call: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_call(method, code)``: told the short method name and status code
        name of every call it audits (the metrics' count per method and code)."""
        self.policy = policy
        self._session_of = session_of or (lambda req: getattr(req, "session_id", "") or "")
        self._on_call = on_call

    def _audit(self, principal: str, method: str, code: grpc.StatusCode, duration_s: float, session_id: str) -> None:
        audit(principal, method, code, duration_s, session_id)
        if self._on_call is not None:
            try:
                self._on_call(method.rsplit("/", 1)[-1], code.name)
            except Exception:  # noqa: BLE001 - metrics never fail a call
                log.debug("metrics hook failed", exc_info=True)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method, metadata))
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method, metadata))
        if handler.stream_stream is not None:  # reflection
            return handler._replace(stream_stream=self._wrap_bidi(handler.stream_stream, method, metadata))
        log.warning("no authentication wrapper for %s: refused", method)
        return None

    async def _enter(self, context, metadata, method: str):
        try:
            principal = self.policy.authenticate(metadata, context.auth_context())
        except PermissionError as exc:
            peer = cap(context.peer())
            log.warning("unauthenticated call to %s from %s: %s", method, peer, exc)
            self._audit(ANONYMOUS, method, grpc.StatusCode.UNAUTHENTICATED, 0.0, "")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing, malformed or unknown credentials")
        return _current.set(principal)

    @contextlib.asynccontextmanager
    async def _call(self, context, metadata, method: str, session: Callable[[], str]):
        """Authenticate, run the handler's body, then write its audit line."""
        token = await self._enter(context, metadata, method)
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            self._audit(_current.get(), method, code, time.perf_counter() - t0, session())
            _reset(token)

    def _wrap_unary(self, behavior, method, metadata):
        async def wrapper(request, context):
            async with self._call(context, metadata, method, lambda: self._session(request)):
                return await behavior(request, context)

        return wrapper

    def _wrap_stream(self, behavior, method, metadata):
        async def wrapper(request, context):
            async with self._call(context, metadata, method, lambda: self._session(request)):
                async for response in behavior(request, context):
                    yield response

        return wrapper

    def _wrap_bidi(self, behavior, method, metadata):
        async def wrapper(request_iterator, context):
            async with self._call(context, metadata, method, lambda: ""):
                async for response in behavior(request_iterator, context):
                    yield response

        return wrapper

    def _session(self, request: Any) -> str:
        try:
            return str(self._session_of(request))
        except Exception:  # noqa: BLE001 - a malformed request has no session id
            return ""


def _reset(token: contextvars.Token) -> None:
    """Undo the principal of a finished call.  A stream closed from another
    context (garbage collection of an abandoned generator) cannot reset it,
    and need not: that context never saw it."""
    try:
        _current.reset(token)
    except ValueError:
        pass


def _code_of(exc: BaseException, context) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AbortError):
        try:
            code = context.code()
        except Exception:  # noqa: BLE001
            code = None
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, (GeneratorExit, asyncio_cancelled())):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def asyncio_cancelled() -> type[BaseException]:
    import asyncio

    return asyncio.CancelledError


def audit(principal: str, method: str, code: grpc.StatusCode, duration_s: float, session_id: str) -> None:
    """One structured line per call: never message content or tokens."""
    audit_log.info(
        "principal=%s method=%s code=%s duration_ms=%.1f session=%s",
        cap(principal, MAX_PRINCIPAL_CHARS), method.rsplit("/", 1)[-1], code.name,
        duration_s * 1000.0, short_hash(session_id),
    )
