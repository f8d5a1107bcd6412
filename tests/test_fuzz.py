"""Bad input, found by property-based fuzzing (hypothesis) of every RPC and of the TCP port.

The promise (docs/guarantees.md, "Bad input"): whatever a client sends, it gets a clear status
(never INTERNAL or UNKNOWN, always a reason), the server keeps serving, and a request that is
refused changes nothing: the checksum of every table (spec, rows, applied-update count) is the
same before and after. A request that is accepted must have been a sane one.

One server per backend serves the whole module: shard 1 of 2 (so ids of the other shard are
wrong too), with small limits so that "huge" is cheap to reach. Runs are derandomized (seeded).
"""
from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_client.memstore_client import MemStoreClient
from memstore.server import ServerThread
from memstore.spec import NAME_RE, OPTIMIZERS
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from tests.integrity import OK, is_serving, server_checksum, status_of
from tests.servers import in_process

Code = grpc.StatusCode
REFUSALS = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED}
LIMITS = {"shard_index": "1", "shard_count": 2, "max_rows_per_request": 4096, "ram_max_bytes": 64 << 20,
          "lmdb_sync": False, "lmdb_map_size": 16 << 20, "lmdb_max_map_size": 64 << 20}
FIXED = {  # long names: the fuzzer will not stumble on them by chance
    "fuzz_fixed_sgd_f32": {"num_rows": 64, "dim": 4, "dtype": "float32", "optimizer": "sgd", "lr": 0.1},
    "fuzz_fixed_adagrad_bf16": {"num_rows": 41, "dim": 3, "dtype": "bfloat16", "optimizer": "adagrad", "lr": 0.5},
}
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- strategies -----------------------------------------------------------------------------

PATH_LIKE = ["", ".", "..", "../x", "../../etc/passwd", "a/b", "/abs", "a\\b", "x" * 1024, "naïve",
             "emoji🙂", "a\x00b", " lead", "tab\tname", "-dash", "tables", "snapshots", ".lock"]
NAMES = st.one_of(st.sampled_from(PATH_LIKE + list(FIXED)), st.text(max_size=200),
                  st.from_regex(NAME_RE, fullmatch=True))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
U64 = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 100))
ARG_NAMES = sorted({arg for args in OPTIMIZERS.values() for arg in args})
ID_LISTS = st.lists(st.one_of(st.integers(-3, 70), st.integers(-2**63, 2**63 - 1)), max_size=40)


def id_bytes(ids: list[int]) -> bytes:
    return np.array(ids, dtype="<i8").tobytes()


@st.composite
def table_specs(draw) -> pb.TableSpec:
    """A valid spec with 0-3 of its fields replaced by anything (bad values are rarely found by
    drawing every field at random: one bad field hides the others)."""
    kind = draw(st.sampled_from(list(OPTIMIZERS)))
    good_args = st.dictionaries(st.sampled_from(list(OPTIMIZERS[kind]) or ["eps"]), st.floats(1e-12, 0.5),
                                max_size=2 if OPTIMIZERS[kind] else 0)
    good = {
        "name": draw(st.from_regex(NAME_RE, fullmatch=True)), "num_rows": draw(st.integers(1, 10**4)),
        "dim": draw(st.integers(1, 64)), "dtype": draw(st.integers(1, 3)),
        "init_kind": draw(st.sampled_from(["zeros", "normal", "uniform"])), "scale": draw(st.floats(0, 10)),
        "seed": draw(st.integers(0, 2**63 - 1)), "kind": kind, "lr": draw(st.floats(0, 10)),
        "args": draw(good_args),
    }
    bad = {
        "name": NAMES, "num_rows": U64, "dim": st.one_of(st.integers(0, 2**32 - 1), st.just(65537)),
        "dtype": st.integers(-2, 6), "init_kind": st.text(max_size=8), "scale": FLOATS, "seed": U64,
        "kind": st.text(max_size=12), "lr": FLOATS,
        "args": st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=8)), FLOATS,
                                min_size=1, max_size=3),
    }
    for field in draw(st.lists(st.sampled_from(sorted(bad)), max_size=3, unique=True)):
        good[field] = draw(bad[field])
    return pb.TableSpec(
        name=good["name"], num_rows=good["num_rows"], dim=good["dim"], dtype=good["dtype"],
        init=pb.InitSpec(kind=good["init_kind"], scale=good["scale"], seed=good["seed"]),
        optimizer=pb.OptimizerSpec(kind=good["kind"], lr=good["lr"], args=good["args"]))


@st.composite
def update_streams(draw) -> list[pb.UpdateChunk]:
    """A valid update of a fixed table with 0-3 things wrong, split over one or two chunks."""
    table = draw(st.sampled_from(list(FIXED)))
    dim, num_rows = FIXED[table]["dim"], FIXED[table]["num_rows"]
    n = draw(st.integers(1, 8))
    good = {
        "table": table, "ids": [2 * i + 1 for i in draw(st.lists(st.integers(0, num_rows // 2 - 1), min_size=n,
                                                                  max_size=n))],  # this shard's: odd ids
        "grads": draw(st.lists(st.floats(-10, 10, width=32), min_size=n * dim, max_size=n * dim)),
        "client_id": draw(st.sampled_from(["", "fuzz-a", "fuzz-b"])), "seq": draw(st.integers(1, 2**40)),
        "total_rows": n, "cut_ids": 0, "cut_grads": 0,
    }
    wide_chars = st.text(st.characters(min_codepoint=0x10000), min_size=65, max_size=257)  # > 256 UTF-8 bytes
    bad = {
        "table": NAMES, "ids": ID_LISTS, "seq": U64, "total_rows": st.one_of(U64, st.integers(4097, 10**7)),
        "client_id": st.one_of(st.text(max_size=300), wide_chars),
        "grads": st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=n * dim,
                          max_size=n * dim),
        "cut_ids": st.sampled_from([1, 7, 8]), "cut_grads": st.sampled_from([2, 4, 4 * dim]),
    }
    for field in draw(st.lists(st.sampled_from(sorted(bad)), max_size=3, unique=True)):
        good[field] = draw(bad[field])
    ids_raw, grads_raw = id_bytes(good["ids"]), np.array(good["grads"], "<f4").tobytes()
    ids_raw = ids_raw[:len(ids_raw) - good["cut_ids"]]                  # wrong sizes
    grads_raw = grads_raw[:len(grads_raw) - good["cut_grads"]]
    cut = draw(st.integers(0, len(good["ids"])))  # rows before the second chunk; header in the first
    per_row = len(grads_raw) // max(1, len(good["ids"]))
    first = pb.UpdateChunk(table=good["table"], client_id=good["client_id"], seq=good["seq"],
                           total_rows=good["total_rows"], ids=ids_raw[:8 * cut], grads=grads_raw[:per_row * cut])
    return [first, pb.UpdateChunk(ids=ids_raw[8 * cut:], grads=grads_raw[per_row * cut:])]


# ---- the server and the oracle --------------------------------------------------------------

@dataclass
class Fuzzed:
    server: ServerThread
    client: MemStoreClient
    stub: pb_grpc.MemStoreStub
    channel: grpc.Channel
    baseline: str = ""

    def check(self, call, allowed: set[Code]) -> Code:
        """Run one fuzzed call: a clear status, still serving, and a refusal changes nothing."""
        code, details = status_of(call)
        assert code in allowed | {OK}, f"{code.name}: {details}"
        assert code == OK or details.strip(), f"{code.name} without a reason"
        assert is_serving(self.channel)
        self._drop_created_tables()
        after = server_checksum(self.client)
        if code != OK:
            assert after == self.baseline, f"refused with {code.name} ({details}) but a table changed"
        self.baseline = after
        return code

    def _drop_created_tables(self) -> None:
        for info in self.client.list_tables():
            if info.spec.name not in FIXED:
                self.client.drop_table(info.spec.name)


@pytest.fixture(scope="module", params=["ram", "lmdb"])
def fuzzed(request, tmp_path_factory):
    data = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "data"
    with in_process(data, request.param, **LIMITS) as srv, MemStoreClient(srv.target, retry_timeout_s=5) as client, \
            grpc.insecure_channel(srv.target) as channel:
        for name, kwargs in FIXED.items():
            client.create_table(name, init="normal", init_scale=0.5, **kwargs)
        fuzzed = Fuzzed(srv, client, pb_grpc.MemStoreStub(channel), channel)
        fuzzed.baseline = server_checksum(client)
        yield fuzzed
        assert server_checksum(client) == fuzzed.baseline


def _sane(spec: pb.TableSpec) -> bool:
    """What an accepted CreateTable may hold: finite, non-negative numbers; betas below 1, eps above 0."""
    args = spec.optimizer.args
    numbers = [spec.init.scale, spec.optimizer.lr, *args.values()]
    return (all(math.isfinite(x) and x >= 0 for x in numbers) and spec.num_rows > 0 and spec.dim > 0
            and all(args.get(beta, 0.0) < 1 for beta in ("beta1", "beta2")) and args.get("eps", 1.0) > 0)


# ---- every RPC ------------------------------------------------------------------------------

@FUZZ
@given(spec=table_specs(), if_not_exists=st.booleans())
def test_create_table(fuzzed, spec, if_not_exists):
    request = pb.CreateTableRequest(spec=spec, if_not_exists=if_not_exists)
    code = fuzzed.check(lambda: fuzzed.stub.CreateTable(request, timeout=10), REFUSALS)
    assert code != OK or _sane(spec), f"accepted an insane spec: {spec}"


@FUZZ
@given(name=NAMES, method=st.sampled_from(["DescribeTable", "DropTable", "Snapshot"]))
def test_table_name_rpcs(fuzzed, name, method):
    if method == "DropTable" and name in FIXED:
        name += "_"  # never drop the tables under test
    request = {"DescribeTable": pb.DescribeTableRequest(name=name), "DropTable": pb.DropTableRequest(name=name),
               "Snapshot": pb.SnapshotRequest(table=name)}[method]
    code = fuzzed.check(lambda: getattr(fuzzed.stub, method)(request, timeout=10), REFUSALS)
    assert code != OK or name in FIXED or (method == "Snapshot" and name == "")


@FUZZ
@given(table=st.one_of(st.sampled_from(list(FIXED)), NAMES),
       ids=st.one_of(ID_LISTS.map(id_bytes), st.binary(max_size=100),
                     st.integers(4097, 20_000).map(lambda n: id_bytes(list(range(1, 2 * n, 2))))))
def test_lookup(fuzzed, table, ids):
    request = pb.LookupRequest(table=table, ids=ids)
    fuzzed.check(lambda: fuzzed.stub.Lookup(request, timeout=10), REFUSALS)


@settings(FUZZ, max_examples=200)
@given(chunks=update_streams())
def test_update(fuzzed, chunks):
    code = fuzzed.check(lambda: fuzzed.stub.Update(iter(chunks), timeout=10), REFUSALS)
    if code == OK:  # only a well-formed, finite update of this shard's rows may be applied
        ids = np.frombuffer(b"".join(c.ids for c in chunks), "<i8")
        grads = np.frombuffer(b"".join(c.grads for c in chunks), "<f4")
        spec = FIXED[chunks[0].table]
        assert chunks[0].total_rows == len(ids) > 0 and grads.size == len(ids) * spec["dim"]
        assert np.isfinite(grads).all() and (ids % 2 == 1).all() and (ids < spec["num_rows"]).all()


@FUZZ
@given(method=st.sampled_from(list(pb.DESCRIPTOR.services_by_name["MemStore"].methods)),
       payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_raw_bytes_to_every_rpc(fuzzed, method, payloads):
    """Bytes that may not even parse as the request message."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    channel = fuzzed.channel
    if method.client_streaming:
        call = lambda: channel.stream_unary(path)(iter(payloads), timeout=10)
    elif method.server_streaming:
        call = lambda: channel.unary_stream(path)(payloads[0], timeout=10)
    else:
        call = lambda: channel.unary_unary(path)(payloads[0], timeout=10)
    fuzzed.check(call, REFUSALS)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@settings(FUZZ, max_examples=40)
@given(prefix=st.sampled_from([b"", H2_PREFACE, H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                               b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"]),
       garbage=st.binary(min_size=1, max_size=4096))
def test_garbage_on_the_tcp_port(fuzzed, prefix, garbage):
    with socket.create_connection(("127.0.0.1", fuzzed.server.port), timeout=5) as sock:
        try:
            sock.sendall(prefix + garbage)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up on us: allowed
    fuzzed.check(lambda: fuzzed.stub.ListTables(pb.ListTablesRequest(), timeout=10), set())


# ---- the named cases, each with the status it must get -------------------------------

SGD = "fuzz_fixed_sgd_f32"  # shard 1 of 2: odd ids 1..63; dim 4


def _update(table=SGD, ids=(1,), grads=None, client_id="named", seq=1, total=None) -> list[pb.UpdateChunk]:
    grads = np.ones((len(ids), 4), "<f4") if grads is None else np.asarray(grads, "<f4")
    return [pb.UpdateChunk(table=table, client_id=client_id, seq=seq, total_rows=len(ids) if total is None else total,
                           ids=id_bytes(list(ids)), grads=grads.tobytes())]


def _spec(**changes) -> pb.TableSpec:
    spec = pb.TableSpec(name="named", num_rows=10, dim=4, dtype=pb.FLOAT32, init=pb.InitSpec(kind="zeros"),
                        optimizer=pb.OptimizerSpec(kind="adam", lr=0.1))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = spec
        for parent in parents:
            target = getattr(target, parent)
        if leaf == "args":
            target.args.update(value)
        else:
            setattr(target, leaf, value)
    return spec


_NAMES = {"empty": "", "dotdot": "../x", "slash": "a/b", "1KB": "x" * 1024, "unicode": "naïve", "nul": "a\x00b"}
NAMED_CASES = {
    **{f"create-name-{k}": ("CreateTable", pb.CreateTableRequest(spec=_spec(name=v)), Code.INVALID_ARGUMENT)
       for k, v in _NAMES.items()},
    **{f"describe-name-{k}": ("DescribeTable", pb.DescribeTableRequest(name=v), Code.NOT_FOUND) for k, v in _NAMES.items()},
    **{f"drop-name-{k}": ("DropTable", pb.DropTableRequest(name=v), Code.NOT_FOUND) for k, v in _NAMES.items()},
    **{f"lookup-name-{k}": ("Lookup", pb.LookupRequest(table=v, ids=id_bytes([1])), Code.NOT_FOUND)
       for k, v in _NAMES.items()},
    **{f"update-name-{k}": ("Update", _update(table=v), Code.NOT_FOUND) for k, v in _NAMES.items() if v},
    **{f"snapshot-name-{k}": ("Snapshot", pb.SnapshotRequest(table=v), Code.NOT_FOUND) for k, v in _NAMES.items() if v},
    "lookup-negative-id": ("Lookup", pb.LookupRequest(table=SGD, ids=id_bytes([1, -1])), Code.INVALID_ARGUMENT),
    "lookup-id-past-the-end": ("Lookup", pb.LookupRequest(table=SGD, ids=id_bytes([65])), Code.INVALID_ARGUMENT),
    "lookup-int64-max": ("Lookup", pb.LookupRequest(table=SGD, ids=id_bytes([2**63 - 1])), Code.INVALID_ARGUMENT),
    "lookup-other-shards-id": ("Lookup", pb.LookupRequest(table=SGD, ids=id_bytes([2])), Code.INVALID_ARGUMENT),
    "lookup-7-byte-ids": ("Lookup", pb.LookupRequest(table=SGD, ids=b"\x01" * 7), Code.INVALID_ARGUMENT),
    "lookup-huge-count": ("Lookup", pb.LookupRequest(table=SGD, ids=id_bytes([1] * 5000)), Code.RESOURCE_EXHAUSTED),
    "lookup-not-protobuf": ("Lookup", b"\xff\xff\xff", Code.INVALID_ARGUMENT),
    "update-nan": ("Update", _update(grads=[[0, np.nan, 0, 0]]), Code.INVALID_ARGUMENT),
    "update-inf": ("Update", _update(ids=(1, 3), grads=[[0] * 4, [-np.inf, 0, 0, 0]]), Code.INVALID_ARGUMENT),
    "update-negative-id": ("Update", _update(ids=(-1,)), Code.INVALID_ARGUMENT),
    "update-short-grads": ("Update", _update(ids=(1, 3), grads=[[1] * 4]), Code.INVALID_ARGUMENT),
    "update-total-rows-u64-max": ("Update", _update(total=2**64 - 1), Code.RESOURCE_EXHAUSTED),
    "update-total-rows-too-many": ("Update", _update(total=5), Code.INVALID_ARGUMENT),
    "update-total-rows-zero": ("Update", _update(total=0), Code.INVALID_ARGUMENT),
    "update-seq-zero": ("Update", _update(seq=0), Code.INVALID_ARGUMENT),
    "update-client-id-4-byte-chars": ("Update", _update(client_id="\U0001F600" * 100), Code.INVALID_ARGUMENT),
    "update-no-chunks": ("Update", [], Code.INVALID_ARGUMENT),
    "create-rows-u64-max": ("CreateTable", pb.CreateTableRequest(spec=_spec(num_rows=2**64 - 1)), Code.INVALID_ARGUMENT),
    "create-rows-zero": ("CreateTable", pb.CreateTableRequest(spec=_spec(num_rows=0)), Code.INVALID_ARGUMENT),
    "create-dim-zero": ("CreateTable", pb.CreateTableRequest(spec=_spec(dim=0)), Code.INVALID_ARGUMENT),
    "create-dtype-99": ("CreateTable", pb.CreateTableRequest(spec=_spec(dtype=99)), Code.INVALID_ARGUMENT),
    "create-lr-nan": ("CreateTable", pb.CreateTableRequest(spec=_spec(optimizer__lr=math.nan)), Code.INVALID_ARGUMENT),
    "create-lr-inf": ("CreateTable", pb.CreateTableRequest(spec=_spec(optimizer__lr=math.inf)), Code.INVALID_ARGUMENT),
    "create-lr-negative": ("CreateTable", pb.CreateTableRequest(spec=_spec(optimizer__lr=-1)), Code.INVALID_ARGUMENT),
    "create-scale-nan": ("CreateTable", pb.CreateTableRequest(spec=_spec(init__scale=math.nan)), Code.INVALID_ARGUMENT),
    "create-eps-nan": ("CreateTable", pb.CreateTableRequest(spec=_spec(optimizer__args={"eps": math.nan})),
                       Code.INVALID_ARGUMENT),
    "create-beta1-one": ("CreateTable", pb.CreateTableRequest(spec=_spec(optimizer__args={"beta1": 1.0})),
                         Code.INVALID_ARGUMENT),
    "create-unknown-arg": ("CreateTable", pb.CreateTableRequest(spec=_spec(optimizer__args={"momentum": 0.9})),
                           Code.INVALID_ARGUMENT),
    "create-existing-name": ("CreateTable", pb.CreateTableRequest(spec=_spec(name=SGD)), Code.ALREADY_EXISTS),
}


@pytest.mark.parametrize("case", list(NAMED_CASES))
def test_named_bad_inputs(fuzzed, case):
    method, request, expected = NAMED_CASES[case]
    if isinstance(request, bytes):
        path = f"/memstore.v1.MemStore/{method}"
        call = lambda: fuzzed.channel.unary_stream(path)(request, timeout=10)
    elif method == "Update":
        call = lambda: fuzzed.stub.Update(iter(request), timeout=10)
    else:
        call = lambda: getattr(fuzzed.stub, method)(request, timeout=10)
    assert fuzzed.check(call, {expected}) == expected
