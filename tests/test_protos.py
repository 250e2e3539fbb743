"""The generated Python in fedjob/v1 is exactly what `make protos` makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

GENERATED = ["fedjob_pb2.py", "fedjob_pb2.pyi", "fedjob_pb2_grpc.py"]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(REPO / "protos"),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(REPO / "protos/fedjob/v1/fedjob.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "fedjob" / "v1" / name).read_text()
        committed = (REPO / "fedjob" / "v1" / name).read_text()
        assert fresh == committed, f"fedjob/v1/{name} drifted from protos/: run `make protos`"


def test_the_protocol_is_versioned() -> None:
    from fedjob.v1 import fedjob_pb2

    assert fedjob_pb2.DESCRIPTOR.package == "fedjob.v1"
