import pytest

from engram_client.memstore_client import MemStoreClient
from tests.servers import in_process


@pytest.fixture(params=["ram", "lmdb"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def server(tmp_path, backend):
    with in_process(tmp_path / "data", backend) as srv:
        yield srv


@pytest.fixture
def client(server):
    with MemStoreClient(server.target, retry_timeout_s=5) as c:
        yield c
