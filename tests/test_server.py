"""The memstore service end to end: a real server (both backends), real gRPC channels."""
from __future__ import annotations

import socket
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram_client.memstore_client import MemStoreClient
from memstore import dtypes
from memstore.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from memstore.init import init_rows
from memstore.spec import InitSpec
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from tests.servers import in_process

RNG = np.random.default_rng(0)


def test_table_lifecycle(client):
    info = client.create_table("t1", 1000, 16, dtype="float16", optimizer="adagrad", lr=0.1)
    assert (info.spec.num_rows, info.spec.dim, info.spec.dtype) == (1000, 16, "float16")
    assert client.describe_table("t1").spec == info.spec
    assert [t.spec.name for t in client.list_tables()] == ["t1"]
    assert client.create_table("t1", 1000, 16, dtype="float16", optimizer="adagrad", lr=0.1,
                               if_not_exists=True).spec == info.spec
    with pytest.raises(AlreadyExists, match="different spec"):
        client.create_table("t1", 1000, 32)
    client.drop_table("t1")
    assert client.list_tables() == []
    with pytest.raises(NotFound):
        client.describe_table("t1")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_untouched_rows_read_as_their_deterministic_init(client, backend, dtype):
    num_rows = 10**11 if backend == "lmdb" else 10**8  # RAM reserves (virtual) memory for every row
    client.create_table("t", num_rows, 8, dtype=dtype, init="normal", init_scale=0.5, seed=7)
    ids = np.array([0, 5, num_rows - 1, 5, 12345678])
    rows = client.lookup("t", ids)
    expected = dtypes.from_float32(init_rows(InitSpec("normal", 0.5, 7), ids, 8), dtype)
    np.testing.assert_array_equal(rows, expected)
    assert rows.dtype == dtypes.storage_dtype(dtype)


def test_large_batches_stream_within_default_limits(client):
    client.create_table("big", 5_000_000, 8, init="uniform", init_scale=1.0)
    ids = RNG.integers(0, 5_000_000, size=1_000_000)
    rows = client.lookup("big", ids)  # 32 MiB of rows: split into calls, streamed in 1 MiB chunks
    assert rows.shape == (1_000_000, 8)
    np.testing.assert_array_equal(rows[::9973], client.lookup("big", ids[::9973]))


def test_sgd_update_sums_duplicates(client):
    client.create_table("t", 100, 4, init="zeros", optimizer="sgd", lr=0.5)
    ids = np.array([3, 7, 3])
    grads = np.array([[1, 2, 3, 4], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=np.float32)
    assert client.update("t", ids, grads)
    rows = client.lookup("t", [3, 7, 8])
    np.testing.assert_allclose(rows, [[-1, -1, -1.5, -2], [-0.5] * 4, [0] * 4])


def test_adagrad_matches_torch(client):
    torch = pytest.importorskip("torch")
    client.create_table("t", 50, 4, init="uniform", init_scale=0.1, seed=3, optimizer="adagrad", lr=0.3)
    start = client.lookup("t", np.arange(50))
    weight = torch.nn.Parameter(torch.tensor(start))
    opt = torch.optim.Adagrad([weight], lr=0.3)
    for _ in range(3):
        ids = RNG.integers(0, 50, size=20)
        grads = RNG.normal(size=(20, 4)).astype(np.float32)
        client.update("t", ids, grads)
        opt.zero_grad()
        weight.grad = torch.sparse_coo_tensor(torch.tensor(ids)[None], torch.tensor(grads), (50, 4)).coalesce()
        opt.step()
    np.testing.assert_allclose(client.lookup("t", np.arange(50)), weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def _raw_update(stub, table, ids, grads, client_id="c1", seq=1, total=None):
    chunk = pb.UpdateChunk(table=table, client_id=client_id, seq=seq,
                           total_rows=len(ids) if total is None else total,
                           ids=np.asarray(ids, "<i8").tobytes(), grads=np.asarray(grads, "<f4").tobytes())
    return stub.Update(iter([chunk]), timeout=10)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.MemStoreStub(channel)


def test_retried_update_is_acknowledged_not_reapplied(client, stub):
    client.create_table("t", 10, 2, init="zeros", lr=1.0)
    grads = np.ones((1, 2), np.float32)
    assert _raw_update(stub, "t", [4], grads, seq=1).applied
    assert not _raw_update(stub, "t", [4], grads, seq=1).applied     # the retry
    assert not _raw_update(stub, "t", [4], grads, seq=1).applied
    assert _raw_update(stub, "t", [4], grads, seq=2).applied
    assert _raw_update(stub, "t", [4], grads, client_id="other", seq=1).applied
    np.testing.assert_allclose(client.lookup("t", [4]), [[-3, -3]])


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.code()


@pytest.mark.parametrize("ids, grads, expected", [
    ([-1], [[1, 1]], "outside table"),
    ([10], [[1, 1]], "outside table"),
    ([1, 2], [[1, 1]], "grads: got 8 bytes, expected 16"),
    ([1], [[np.nan, 1]], "NaN or Inf"),
    ([1, 2], [[1, 1], [np.inf, 0]], "NaN or Inf"),
])
def test_bad_updates_are_refused_and_change_nothing(client, stub, ids, grads, expected):
    client.create_table("t", 10, 2, init="normal")
    before = client.lookup("t", np.arange(10))
    with pytest.raises(grpc.RpcError) as exc:
        _raw_update(stub, "t", ids, grads)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT and expected in exc.value.details()
    np.testing.assert_array_equal(client.lookup("t", np.arange(10)), before)


def test_malformed_requests_get_clear_statuses(client, stub):
    client.create_table("t", 10, 2)
    cases = [
        (lambda: list(stub.Lookup(pb.LookupRequest(table="t", ids=b"\x01\x02\x03")))
         , grpc.StatusCode.INVALID_ARGUMENT, "whole number of int64"),
        (lambda: list(stub.Lookup(pb.LookupRequest(table="nope", ids=b""))), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda: _raw_update(stub, "t", [1], [[1, 1]], total=5), grpc.StatusCode.INVALID_ARGUMENT, "total_rows=5"),
        (lambda: _raw_update(stub, "t", [1], [[1, 1]], total=0), grpc.StatusCode.INVALID_ARGUMENT, "total_rows"),
        (lambda: _raw_update(stub, "t", [1], [[1, 1]], seq=0), grpc.StatusCode.INVALID_ARGUMENT, "seq"),
        (lambda: stub.Update(iter([]), timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "empty stream"),
        (lambda: stub.Update(iter([pb.UpdateChunk(table="t", total_rows=10**12)]), timeout=5),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "max_rows_per_request"),
        (lambda: stub.CreateTable(pb.CreateTableRequest(spec=pb.TableSpec(name="x", num_rows=0, dim=4, dtype=1))),
         grpc.StatusCode.INVALID_ARGUMENT, "num_rows"),
        (lambda: stub.CreateTable(pb.CreateTableRequest(spec=pb.TableSpec(name="x", num_rows=10**12, dim=4,
                                                                          dtype=1))),
         grpc.StatusCode.INVALID_ARGUMENT, "num_rows"),
        (lambda: stub.CreateTable(pb.CreateTableRequest(spec=pb.TableSpec(name="x", num_rows=5, dim=0, dtype=1))),
         grpc.StatusCode.INVALID_ARGUMENT, "dim"),
        (lambda: stub.CreateTable(pb.CreateTableRequest(spec=pb.TableSpec(name="x", num_rows=5, dim=4))),
         grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        (lambda: stub.CreateTable(pb.CreateTableRequest(spec=pb.TableSpec(
            name="x", num_rows=5, dim=4, dtype=1, optimizer=pb.OptimizerSpec(kind="lamb")))),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown optimizer"),
    ]
    for call, code, text in cases:
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert _code(exc) == code and text in exc.value.details(), (code, text, exc.value.details())


@pytest.mark.parametrize("name", ["", "../x", "a/b", "/abs", ".hidden", "x" * 1000, "naïve", "a\x00b", "..", "a..b"])
def test_table_names_can_never_be_paths(client, name):
    with pytest.raises(InvalidArgument, match="invalid table name"):
        client.create_table(name, 10, 2)


def test_oversized_request_is_refused(tmp_path):
    with in_process(tmp_path / "d", max_rows_per_request=1000) as srv, \
            MemStoreClient(srv.target, max_ids_per_call=5000, shared_memory="off") as client:
        client.create_table("t", 10_000, 2)
        with pytest.raises(ResourceExhausted, match="max_rows_per_request=1000"):
            client.lookup("t", np.arange(2000))
        assert client.lookup("t", np.arange(1000)).shape == (1000, 2)


def test_wide_rows_hit_the_byte_limit_before_any_work(tmp_path):
    with in_process(tmp_path / "d", max_request_bytes=1 << 20) as srv, \
            MemStoreClient(srv.target, shared_memory="off") as client:  # the server's limits: over gRPC
        client.create_table("wide", 100, 65536)  # 256 KiB per float32 row
        with pytest.raises(ResourceExhausted, match="max_request_bytes"):
            client.lookup("wide", np.arange(5))
        with pytest.raises(ResourceExhausted, match="max_request_bytes"):
            client.update("wide", np.arange(5), np.zeros((5, 65536), np.float32))
        assert client.lookup("wide", np.arange(4)).shape == (4, 65536)


def test_read_only_refuses_writes(tmp_path):
    with in_process(tmp_path / "d", "lmdb") as srv, MemStoreClient(srv.target) as client:
        client.create_table("t", 10, 2)
    with in_process(tmp_path / "d", "lmdb", read_only=True) as srv, MemStoreClient(srv.target) as client:
        assert client.lookup("t", [1]).shape == (1, 2)
        for write in (lambda: client.update("t", [1], np.ones((1, 2))), lambda: client.create_table("u", 5, 2),
                      lambda: client.drop_table("t")):
            with pytest.raises(PermissionDenied, match="read-only"):
                write()


def test_token_is_required_except_for_health(tmp_path):
    with in_process(tmp_path / "d", token="s3cret") as srv:
        with MemStoreClient(srv.target, token="s3cret") as good:
            good.create_table("t", 10, 2)
        for token in (None, "wrong"):
            with MemStoreClient(srv.target, token=token) as bad, pytest.raises(Exception) as exc:
                bad.list_tables()
            assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(srv.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_reflection_and_metrics(tmp_path):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with in_process(tmp_path / "d", metrics_port=0) as srv, MemStoreClient(srv.target, shared_memory="off") as client:
        client.create_table("t", 100, 4)
        client.lookup("t", np.arange(10))
        with grpc.insecure_channel(srv.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="memstore.v1.MemStore"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            services = {s.name for s in next(replies).list_services_response.service}
            assert "memstore.v1.MemStore" in services
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics").read().decode()
        assert 'memstore_rows_total{method="Lookup",table="t"} 10.0' in text
        assert 'memstore_requests_total{code="OK",method="CreateTable"} 1.0' in text
        assert "memstore_request_seconds_bucket" in text and "memstore_table_bytes" in text


def test_garbage_on_the_port_does_not_hurt(server, client):
    client.create_table("t", 10, 2)
    before = client.lookup("t", np.arange(10))
    for garbage in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", bytes(RNG.integers(0, 256, 4096, dtype=np.uint8))):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(garbage)
            sock.settimeout(2)
            try:
                sock.recv(1024)
            except (TimeoutError, ConnectionResetError):
                pass
    np.testing.assert_array_equal(client.lookup("t", np.arange(10)), before)


def test_concurrency_limit_pushes_back_with_resource_exhausted(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with in_process(tmp_path / "d", max_concurrent_requests=1, workers=1) as srv:
        with MemStoreClient(srv.target) as client:
            client.create_table("t", 2_000_000, 64)
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.MemStoreStub(channel)
            ids = RNG.integers(0, 2_000_000, 200_000).astype("<i8").tobytes()

            def lookup(_):
                try:
                    list(stub.Lookup(pb.LookupRequest(table="t", ids=ids), timeout=30))
                    return "OK"
                except grpc.RpcError as exc:
                    return exc.code().name
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lookup, range(16)))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "RESOURCE_EXHAUSTED" in codes and "OK" in codes


def test_split_lookups_follow_a_table_recreated_with_other_rows(client):
    client.create_table("t", 100_000, 8, init="uniform", init_scale=1.0)
    ids = RNG.integers(0, 100_000, 40_000)  # large enough to be split into parallel calls
    assert client.lookup("t", ids).shape == (40_000, 8)
    client.drop_table("t")
    client.create_table("t", 100_000, 16, dtype="float16", init="uniform", init_scale=1.0)
    rows = client.lookup("t", ids)
    assert rows.shape == (40_000, 16) and rows.dtype == np.float16
    np.testing.assert_array_equal(rows[:100], client.lookup("t", ids[:100]))
