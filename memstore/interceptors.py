"""Cross-cutting server behaviour, each in one place: errors → status codes, auth, metrics.

grpc.aio interceptors can only swap a method's handler, so `_wrap` rebuilds a handler around
its behaviour for each RPC shape (memstore's unary-unary, unary-stream and stream-unary, and
server reflection's stream-stream).
"""
from __future__ import annotations

import errno
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager

import grpc

from memstore.errors import InvalidArgument, MemStoreError, ResourceExhausted
from memstore.metrics import Metrics
from memstore.protocol import ERROR_TRAILER

log = logging.getLogger("memstore.rpc")


# Health checks must answer without credentials (load balancers and kubelet probes have none)
# and even when the server is saturated (a busy shard is not a dead one).
HEALTH_METHODS = ("/grpc.health.v1.Health/",)

Guard = Callable[[grpc.aio.ServicerContext, str], AbstractAsyncContextManager]


def _method_name(details: grpc.HandlerCallDetails) -> str:
    return details.method.rsplit("/", 1)[-1]


def _wrap(handler: grpc.RpcMethodHandler | None, guard: Guard, method: str):
    """A copy of `handler` whose behaviour runs inside `async with guard(context, method)`."""
    if handler is None:
        return None
    if handler.unary_unary:
        async def unary_unary(request, context):
            async with guard(context, method):
                return await handler.unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        async def unary_stream(request, context):
            async with guard(context, method):  # stream errors surface while iterating
                async for item in handler.unary_stream(request, context):
                    yield item
        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        async def stream_unary(request_iterator, context):
            async with guard(context, method):
                return await handler.stream_unary(request_iterator, context)
        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream:  # server reflection: it must need the token too
        async def stream_stream(request_iterator, context):
            async with guard(context, method):
                async for item in handler.stream_stream(request_iterator, context):
                    yield item
        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer)
    return handler


# A write that failed for lack of space: a full disk, a quota, a file size limit.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps `MemStoreError` subclasses to their status code, and running out of memory or disk
    space to RESOURCE_EXHAUSTED; anything else becomes INTERNAL (logged with its traceback) so
    one bad request never takes the server down. Requests that do not parse are INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, details):
        return _wrap(_parse_in_handler(await continuation(details)), self._guard, _method_name(details))

    @staticmethod
    @asynccontextmanager
    async def _guard(context, method):
        try:
            try:
                yield
            except MemoryError:
                raise ResourceExhausted(f"{method}: not enough memory for this request; send fewer rows") from None
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                raise ResourceExhausted(f"{method}: out of disk space ({exc.strerror}); nothing was written "
                                        "(free space or raise the quota, then retry)") from None
        except MemStoreError as exc:
            # The trailer tells clients this is our verdict on the request (e.g. too large),
            # not transient back-pressure from gRPC itself: retrying will not help.
            context.set_trailing_metadata(((ERROR_TRAILER, type(exc).__name__),))
            await context.abort(exc.code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("internal error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server log")


class _Unparsable:
    """What a request that is not a valid protobuf message deserializes to."""

    def __init__(self, error: Exception):
        self.error = error


def _parse_in_handler(handler: grpc.RpcMethodHandler | None):
    """A copy of `handler` whose requests fail to parse inside the handler, as InvalidArgument.

    A deserializer that raises makes gRPC answer UNKNOWN (INTERNAL for a stream) and log a
    traceback: the client cannot tell its garbage from a server bug."""
    if handler is None or handler.request_deserializer is None:
        return handler
    parse = handler.request_deserializer

    def tolerant(raw: bytes):
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: refused in `checked`
            return _Unparsable(exc)

    def checked(request):
        if isinstance(request, _Unparsable):
            raise InvalidArgument(f"request is not a valid protobuf message: {request.error}")
        return request

    if handler.unary_unary:
        async def unary_unary(request, context):
            return await handler.unary_unary(checked(request), context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, tolerant, handler.response_serializer)
    if handler.unary_stream:
        async def unary_stream(request, context):
            async for item in handler.unary_stream(checked(request), context):
                yield item
        return grpc.unary_stream_rpc_method_handler(unary_stream, tolerant, handler.response_serializer)
    if handler.stream_unary:
        async def stream_unary(request_iterator, context):
            async def requests():
                async for request in request_iterator:
                    yield checked(request)
            return await handler.stream_unary(requests(), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, tolerant, handler.response_serializer)
    return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` on every RPC but health, compared in constant time."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_METHODS):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        presented = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(presented, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        reason = "missing bearer token" if not presented else "wrong bearer token"
        return _wrap(handler, _refuse(reason), _method_name(details))


def _refuse(reason: str) -> Guard:
    @asynccontextmanager
    async def refuse(context, method):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {reason}")
        yield  # never reached: abort raises
    return refuse


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `limit` RPCs in progress (health checks exempt); beyond it RESOURCE_EXHAUSTED at once,
    without the memstore-error trailer, so clients treat it as back-pressure and retry."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0  # touched only on the event loop: no lock needed

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(HEALTH_METHODS):
            return handler
        return _wrap(handler, self._guard, _method_name(details))

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """A request that only waits gives its slot back meanwhile: a data-parallel step waits for
        all of its W ranks, so W > limit waiting shares would otherwise lock each other out."""
        self.in_flight -= 1
        try:
            yield
        finally:
            self.in_flight += 1

    @asynccontextmanager
    async def _guard(self, context, method):
        if self.in_flight >= self.limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self.in_flight} requests in flight "
                                f"(max_concurrent_requests={self.limit}); retry with backoff")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Request counts by status code, latency histograms and in-flight requests per method."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        return _wrap(await continuation(details), self._guard, _method_name(details))

    @asynccontextmanager
    async def _guard(self, context, method):
        start = time.perf_counter()
        code = "OK"
        self.metrics.inflight.labels(method).inc()
        try:
            yield
        except grpc.aio.AbortError:
            code = context.code().name if context.code() else "UNKNOWN"
            raise
        except MemStoreError as exc:
            code = exc.code.name
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.metrics.inflight.labels(method).dec()
            self.metrics.requests.labels(method, code).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)
