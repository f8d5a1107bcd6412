"""The checked-in gRPC code must match protos/: regenerate into a temp dir and compare."""
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["memstore_pb2.py", "memstore_pb2.pyi", "memstore_pb2_grpc.py"]


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(ROOT / "protos/memstore/v1/memstore.proto")], check=True)
    stale = [name for name in GENERATED
             if not filecmp.cmp(tmp_path / "memstore/v1" / name, ROOT / "memstore/v1" / name, shallow=False)]
    assert not stale, f"{stale} differ from protos/memstore/v1/memstore.proto: run `make proto` and commit"
