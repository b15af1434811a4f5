"""Service errors and their gRPC status codes, in one place.

Code in the service raises the exceptions below; :class:`ErrorMappingInterceptor`
turns them into status codes for every EdgeLLM method.  A request that cannot
be parsed is INVALID_ARGUMENT.  Anything else becomes
INTERNAL with a generic message and a reference id; the traceback is logged on
the server and never sent to the client.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from typing import Any, Callable

import grpc

from edge_service.auth import cap

log = logging.getLogger(__name__)

#: Longest status detail sent (and logged): details may quote what a client
#: sent, which must not be echoed back or into the log at any length.
MAX_DETAIL_CHARS = 512

# Methods of this service are wrapped, and health (open to everyone, so its
# requests are as untrusted as any); reflection keeps its own handling.
SERVICE_PREFIX = "/edgeroute.v1.EdgeLLM/"
WRAPPED_PREFIXES = (SERVICE_PREFIX, "/grpc.health.v1.Health/")


#: Trailing metadata key of a RESOURCE_EXHAUSTED answer: seconds after which a
#: retry is expected to succeed (the queue's estimate), when the server has one.
RETRY_AFTER_KEY = "edgeroute-retry-after-s"


class EdgeServiceError(Exception):
    """An error whose message is safe to show to the client.

    ``retry_after_s``: sent as :data:`RETRY_AFTER_KEY` trailing metadata, so a
    client can use the estimate without parsing the message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidArgument(EdgeServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EdgeServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EdgeServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(EdgeServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(EdgeServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(EdgeServiceError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(EdgeServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(EdgeServiceError):
    """The edge cannot serve now but another try (or the device) can: an
    upstream engine that is down, refused the gateway or failed mid-answer."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(EdgeServiceError):
    """A server-side time limit (``--max-generation-s``) passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class _Malformed:
    """What a request that could not be parsed becomes, so that the handler's
    wrapper answers INVALID_ARGUMENT (grpc itself would answer UNKNOWN with the
    parser's exception text)."""

    def __init__(self, exc: Exception) -> None:
        self.error = InvalidArgument(f"malformed request: {type(exc).__name__}")


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
            return _Malformed(exc)

    return parse


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    if isinstance(exc, EdgeServiceError):
        return exc.code, cap(str(exc) or exc.code.name, MAX_DETAIL_CHARS)
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error (ref {ref})"


def trailing_metadata_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    retry = getattr(exc, "retry_after_s", None)
    if isinstance(exc, EdgeServiceError) and retry is not None:
        return ((RETRY_AFTER_KEY, f"{max(0.0, retry):.3f}"),)
    return ()


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code, message = status_for(exc)
    if code is not grpc.StatusCode.INTERNAL:
        log.info("%s: %s", code.name, message)
    await context.abort(code, message, trailing_metadata=trailing_metadata_for(exc))


def _wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                raise request.error
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps them all
            await _abort(context, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                raise request.error
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by EdgeLLM (and health) methods to gRPC status codes;
    a request that cannot be parsed is INVALID_ARGUMENT, never UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(WRAPPED_PREFIXES):
            return handler
        parse = _safe_deserializer(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary), request_deserializer=parse)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream), request_deserializer=parse)
        log.warning("no error mapping for %s: not a unary or async-generator method", handler_call_details.method)
        return handler
