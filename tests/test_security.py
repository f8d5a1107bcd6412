"""Security: loopback by default, bearer token on every RPC but health, TLS and mutual TLS,
read-only mode, no pickle on the wire or on disk, table names that cannot leave the data dir.

The promises and the threat model: docs/security.md; the index of tests: docs/guarantees.md.
Certificates are generated here (the `cryptography` package): a CA, a server certificate for
localhost/127.0.0.1, a client certificate, and a rogue CA with its own client certificate.
"""
from __future__ import annotations

import ast
import datetime as dt
import hmac
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import lmdb
import msgpack
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engram_client.memstore_client import MemStoreClient, TlsConfig
from memstore.config import ServerConfig
from memstore.errors import MemStoreError
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from tests.integrity import OK, is_serving, server_checksum, status_of
from tests.servers import ServeProcess, in_process

ROOT = Path(__file__).resolve().parents[1]
SERVICE = pb.DESCRIPTOR.services_by_name["MemStore"]
TOKEN = "s3cret-token"

# One well-formed request per RPC: what an attacker without credentials might send.
REQUESTS = {
    "CreateTable": pb.CreateTableRequest(spec=pb.TableSpec(name="evil", num_rows=10, dim=2, dtype=pb.FLOAT32)),
    "DropTable": pb.DropTableRequest(name="t"),
    "ListTables": pb.ListTablesRequest(),
    "DescribeTable": pb.DescribeTableRequest(name="t"),
    "Lookup": pb.LookupRequest(table="t", ids=np.arange(4, dtype="<i8").tobytes()),
    "Update": [pb.UpdateChunk(table="t", client_id="evil", seq=1, total_rows=1, ids=np.zeros(1, "<i8").tobytes(),
                              grads=np.ones(2, "<f4").tobytes())],
    "Snapshot": pb.SnapshotRequest(table="t"),
    "Restore": pb.RestoreRequest(table="t", tag="ck"),
    "MapTable": pb.MapTableRequest(table="t"),
    "Stats": pb.StatsRequest(),
}
WRITES = {"CreateTable", "DropTable", "Update", "Restore"}


def call(channel: grpc.Channel, method: str, metadata=()) -> tuple[grpc.StatusCode, str]:
    return _status(pb_grpc.MemStoreStub(channel), method, REQUESTS[method], metadata)


def _status(stub: pb_grpc.MemStoreStub, method: str, request, metadata=()) -> tuple[grpc.StatusCode, str]:
    """Status of one raw call; `request` is a message, or a list of chunks for Update."""
    rpc = getattr(stub, method)
    if method == "Update":
        return status_of(lambda: rpc(iter(request), timeout=10, metadata=metadata))
    return status_of(lambda: rpc(request, timeout=10, metadata=metadata))


def test_every_rpc_is_covered():
    assert set(REQUESTS) == {m.name for m in SERVICE.methods}


# ---- network exposure -----------------------------------------------------------------------

@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc/net/tcp")
def test_default_bind_is_loopback_only(tmp_path):
    assert ServerConfig().host == "127.0.0.1"
    with ServeProcess(tmp_path / "data", "ram") as srv:  # no --host
        listening = _listening_addresses(srv.port)
    assert listening == {"127.0.0.1"}, listening


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of TCP sockets in LISTEN state on `port` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(words)
                found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # gRPC may listen on ::ffff:127.0.0.1
    return found


# ---- bearer token ---------------------------------------------------------------------------

BAD_CREDENTIALS = {
    "none": (),
    "wrong": (("authorization", "Bearer wrong"),),
    "prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "longer": (("authorization", f"Bearer {TOKEN}x"),),
    "no-scheme": (("authorization", TOKEN),),
    "lowercase-scheme": (("authorization", f"bearer {TOKEN}"),),
    "other-header": (("x-token", TOKEN),),
}


@pytest.fixture
def token_server(tmp_path):
    with in_process(tmp_path / "data", "lmdb", token=TOKEN) as srv, \
            MemStoreClient(srv.target, token=TOKEN) as client, grpc.insecure_channel(srv.target) as channel:
        client.create_table("t", 10, 2)
        yield srv, client, channel


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
def test_every_rpc_but_health_needs_the_token(token_server, credentials):
    _, client, channel = token_server
    before = server_checksum(client)
    for method in REQUESTS:
        code, details = call(channel, method, BAD_CREDENTIALS[credentials])
        assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=BAD_CREDENTIALS[credentials])
    assert status_of(lambda: reflection)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert is_serving(channel) and is_serving(channel, service="memstore.v1.MemStore")
    assert server_checksum(client) == before  # refused calls did nothing


def test_the_right_token_passes(token_server):
    _, _, channel = token_server
    for method in REQUESTS:
        code, details = call(channel, method, (("authorization", f"Bearer {TOKEN}"),))
        assert code != grpc.StatusCode.UNAUTHENTICATED, (method, details)


def test_the_token_is_compared_in_constant_time(token_server, monkeypatch):
    """The comparison goes through hmac.compare_digest (time independent of where the bytes
    differ); a spy around the real function proves it sees both full values."""
    _, _, channel = token_server
    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert call(channel, "ListTables", BAD_CREDENTIALS["prefix"])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert (f"Bearer {TOKEN[:-1]}".encode(), f"Bearer {TOKEN}".encode()) in seen


@pytest.mark.subprocess
def test_cli_token_flag_and_env(tmp_path):
    with ServeProcess(tmp_path / "data", "ram", "--token", TOKEN) as srv:
        def memstore(*args: str, token: str | None) -> subprocess.CompletedProcess:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTORE_")}
            env |= {"MEMSTORE_TOKEN": token} if token else {}
            return subprocess.run([sys.executable, "-m", "memstore.cli", *args, "--target", srv.target],
                                  capture_output=True, text=True, timeout=60, env=env, check=False)
        refused = memstore("ls", token=None)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        assert memstore("ls", token=TOKEN).returncode == 0
        assert memstore("health", token=None).returncode == 0  # probes need no token


# ---- TLS and mutual TLS ---------------------------------------------------------------------

@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, sans=()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = _key(), _key()
    ca = _cert("memstore test CA", ca_key, "memstore test CA", ca_key, ca=True)
    rogue = _cert("rogue CA", rogue_key, "rogue CA", rogue_key, ca=True)
    server_key, client_key, rogue_client_key = _key(), _key(), _key()
    server = _cert("memstore", server_key, "memstore test CA", ca_key, ca=False,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("trainer", client_key, "memstore test CA", ca_key, ca=False)
    rogue_client = _cert("trainer", rogue_client_key, "rogue CA", rogue_key, ca=False)
    return Pki(_write(d / "ca.pem", ca), _write(d / "server.pem", server), _write(d / "server.key", key=server_key),
               _write(d / "client.pem", client), _write(d / "client.key", key=client_key),
               _write(d / "rogue-ca.pem", rogue), _write(d / "rogue-client.pem", rogue_client),
               _write(d / "rogue-client.key", key=rogue_client_key))


def _reaches(target: str, tls: TlsConfig | None, token: str | None = None) -> grpc.StatusCode:
    """The status of ListTables over a fresh channel (no retries: a failed handshake is final here)."""
    try:
        with MemStoreClient(target, tls=tls, token=token, retry_timeout_s=0, timeout_s=5) as client:
            client.list_tables()
    except MemStoreError as exc:
        return exc.code
    return OK


def test_tls(tmp_path, pki):
    with in_process(tmp_path / "data", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as srv:
        assert _reaches(srv.target, TlsConfig(ca_cert=str(pki.ca))) == OK
        assert _reaches(f"localhost:{srv.port}", TlsConfig(ca_cert=str(pki.ca))) == OK
        assert _reaches(srv.target, None) == grpc.StatusCode.UNAVAILABLE                        # plaintext
        assert _reaches(srv.target, TlsConfig(ca_cert=str(pki.rogue_ca))) == grpc.StatusCode.UNAVAILABLE
        assert _reaches(srv.target, TlsConfig(ca_cert=str(pki.ca), server_name="other.example")) \
            == grpc.StatusCode.UNAVAILABLE                                                       # name mismatch


def test_mutual_tls(tmp_path, pki):
    with in_process(tmp_path / "data", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                    tls_client_ca=str(pki.ca)) as srv:
        trusted = TlsConfig(ca_cert=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key))
        rogue = TlsConfig(ca_cert=str(pki.ca), client_cert=str(pki.rogue_client_cert),
                          client_key=str(pki.rogue_client_key))
        assert _reaches(srv.target, trusted) == OK
        assert _reaches(srv.target, TlsConfig(ca_cert=str(pki.ca))) == grpc.StatusCode.UNAVAILABLE  # no cert
        assert _reaches(srv.target, rogue) == grpc.StatusCode.UNAVAILABLE
        assert _reaches(srv.target, None) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_and_token_together(tmp_path, pki):
    with in_process(tmp_path / "data", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                    tls_client_ca=str(pki.ca), token=TOKEN) as srv:
        trusted = TlsConfig(ca_cert=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key))
        assert _reaches(srv.target, trusted, token=TOKEN) == OK
        assert _reaches(srv.target, trusted) == grpc.StatusCode.UNAUTHENTICATED
        creds = trusted.credentials()
        with grpc.secure_channel(srv.target, creds) as channel:  # probes: TLS, no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- read-only ------------------------------------------------------------------------------

def test_read_only_refuses_every_write_and_changes_nothing(tmp_path):
    """tests/test_server.py::test_read_only_refuses_writes covers the client; here every RPC
    raw, and the data files on disk."""
    with in_process(tmp_path / "data", "lmdb") as srv, MemStoreClient(srv.target) as client:
        client.create_table("t", 10, 2)
        client.update("t", [1], np.ones((1, 2)))
    data_file = tmp_path / "data" / "tables" / "t" / "data.mdb"
    before_bytes = data_file.read_bytes()
    with in_process(tmp_path / "data", "lmdb", read_only=True, token=TOKEN) as srv, \
            MemStoreClient(srv.target, token=TOKEN) as client, grpc.insecure_channel(srv.target) as channel:
        before = server_checksum(client)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        for method in REQUESTS:
            code, details = call(channel, method, auth)
            if method in WRITES:
                assert code == grpc.StatusCode.PERMISSION_DENIED and "read-only" in details, (method, code)
            else:
                assert code == OK, (method, code, details)
        assert call(channel, "Update")[0] == grpc.StatusCode.UNAUTHENTICATED  # auth is checked first
        assert server_checksum(client) == before
    assert data_file.read_bytes() == before_bytes


# ---- no pickle ------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
SOURCES = [p for package in ("memstore", "engram_client", "bench", "demo", "examples")
           for p in sorted((ROOT / package).rglob("*.py")) if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Imports of pickle-like modules; allow_pickle=True; torch.load without weights_only=True;
    yaml.load/unsafe_load/full_load (yaml.safe_load is fine)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is True:
            found.append("allow_pickle=True")
        name = ast.unparse(node.func)
        weights_only = keywords.get("weights_only")
        if name.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value):
            found.append("torch.load without weights_only=True")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append(name)
    return found


def test_no_pickle_in_the_source():
    assert len(SOURCES) > 20
    offenders = {str(p.relative_to(ROOT)): bad for p in SOURCES if (bad := _unsafe_calls(ast.parse(p.read_text())))}
    assert not offenders, offenders


def test_the_wire_carries_plain_data_only():
    """No google.protobuf.Any (arbitrary types) and nothing outside memstore.v1 in any message."""
    def fields(message):
        for f in message.fields:
            yield f
            if f.message_type is not None and f.message_type.full_name.startswith("memstore.v1."):
                yield from fields(f.message_type)
    for method in SERVICE.methods:
        for message in (method.input_type, method.output_type):
            for f in fields(message):
                if f.message_type is not None:
                    assert f.message_type.full_name.startswith("memstore.v1."), f.full_name


@pytest.mark.parametrize("backend", ["ram", "lmdb"])
def test_files_on_disk_load_without_pickle(tmp_path, backend):
    """Snapshots: .npy with allow_pickle=False and msgpack without extension types; LMDB: the
    spec is strict msgpack, rows and state raw bytes."""
    with in_process(tmp_path / "data", backend) as srv, MemStoreClient(srv.target) as client:
        client.create_table("t", 100, 8, dtype="bfloat16", optimizer="adam", lr=0.1)
        client.update("t", np.arange(0, 100, 3), np.ones((34, 8)))
        snapshot = Path(client.snapshot("t")[0])
    for npy in sorted(snapshot.glob("*.npy")):
        array = np.load(npy, allow_pickle=False)
        assert array.dtype != object and array.dtype.kind in "iuf", npy.name
    meta = msgpack.unpackb((snapshot / "meta.msgpack").read_bytes(), raw=False, strict_map_key=True,
                           ext_hook=_refuse_extension)
    assert meta["spec"]["name"] == "t"
    if backend == "lmdb":
        env = lmdb.open(str(tmp_path / "data" / "tables" / "t"), readonly=True, max_dbs=8, lock=False)
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            assert msgpack.unpackb(txn.get(b"spec"), raw=False, ext_hook=_refuse_extension)["name"] == "t"
        env.close()


def _refuse_extension(code: int, data: bytes):
    raise AssertionError(f"msgpack extension type {code} on disk")


# ---- table names and the data dir -----------------------------------------------------------

ESCAPES = ["../evil", "../../evil", "/tmp/evil", "a/../../evil", "..", ".", "evil/", "evil\x00", "~", "$HOME",
           "..\\evil", "tables/../../evil"]
LOOKS_LIKE_THE_DATA_DIR = ["tables", "snapshots", "memmap"]  # valid names: they must stay inside


@pytest.mark.parametrize("backend", ["ram", "lmdb"])
def test_table_names_never_leave_the_data_dir(tmp_path, backend):
    """tests/test_server.py::test_table_names_can_never_be_paths checks CreateTable's refusal;
    here every name-taking RPC, and the files that exist afterwards."""
    (tmp_path / "outside").mkdir()
    outside_before = _files(tmp_path, exclude=tmp_path / "data")
    with in_process(tmp_path / "data", backend) as srv, MemStoreClient(srv.target) as client, \
            grpc.insecure_channel(srv.target) as channel:
        client.create_table("ok.name-1", 10, 2)
        stub = pb_grpc.MemStoreStub(channel)
        for name in ESCAPES:
            for method, request in _requests_naming(name).items():
                code, _ = _status(stub, method, request)
                assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (method, name, code)
        for name in ["ok.name-1", *LOOKS_LIKE_THE_DATA_DIR]:
            client.create_table(name, 10, 2, if_not_exists=True)
            client.update(name, [1], np.ones((1, 2)))
            client.snapshot(name)
        client.drop_table("snapshots")
    assert _files(tmp_path, exclude=tmp_path / "data") == outside_before
    data = (tmp_path / "data").resolve()
    for path in (tmp_path / "data").rglob("*"):
        assert data in path.resolve().parents, path


def _requests_naming(name: str) -> dict[str, object]:
    ids, grads = np.zeros(1, "<i8").tobytes(), np.ones(2, "<f4").tobytes()
    return {"CreateTable": pb.CreateTableRequest(spec=pb.TableSpec(name=name, num_rows=10, dim=2, dtype=pb.FLOAT32)),
            "DropTable": pb.DropTableRequest(name=name), "DescribeTable": pb.DescribeTableRequest(name=name),
            "Lookup": pb.LookupRequest(table=name, ids=ids), "Snapshot": pb.SnapshotRequest(table=name),
            "Update": [pb.UpdateChunk(table=name, client_id="x", seq=1, total_rows=1, ids=ids, grads=grads)]}


def _files(root: Path, exclude: Path) -> set[Path]:
    return {p for p in root.rglob("*") if exclude not in p.parents and p != exclude}


def test_admin_cli_speaks_mutual_tls(tmp_path, pki):
    import subprocess
    import sys
    with in_process(tmp_path / "data", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                    tls_client_ca=str(pki.ca)) as srv:
        tls = ["--tls-ca", str(pki.ca), "--tls-client-cert", str(pki.client_cert),
               "--tls-client-key", str(pki.client_key), "--target", srv.target]
        for command in (["health"], ["ls"]):
            done = subprocess.run([sys.executable, "-m", "memstore.cli", *command, *tls],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
        plain = subprocess.run([sys.executable, "-m", "memstore.cli", "health", "--target", srv.target],
                               capture_output=True, text=True, timeout=60, check=False)
        assert plain.returncode == 1
