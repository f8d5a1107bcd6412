"""Typed errors raised inside memstore; the one place that maps them to gRPC status codes.

Code inside the server raises these; `memstore.interceptors.ErrorInterceptor` turns them into
status codes exactly once. Clients see the same classes again (`MemStoreError.from_rpc_error`).
"""
from __future__ import annotations

import grpc


class MemStoreError(Exception):
    """Base class: carries the gRPC status code it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(MemStoreError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MemStoreError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MemStoreError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(MemStoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(MemStoreError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MemStoreError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(MemStoreError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(MemStoreError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MemStoreError):
    """A data-parallel step that was dropped (a rank missed it): nothing of it was applied."""
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(MemStoreError):
    """The call's deadline (a client's timeout) passed before the server answered; the server may
    still have done the work."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE = {cls.code: cls for cls in MemStoreError.__subclasses__()}


def from_status(code: grpc.StatusCode, message: str) -> MemStoreError:
    """The project error for a status code received over the wire."""
    return _BY_CODE.get(code, MemStoreError)(message)
