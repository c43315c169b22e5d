"""Regenerate descriptor.py from inference.proto (`make protocol`; needs grpcio-tools, the dev extra).

The service loads the messages from this serialized descriptor into a pool of its own, not protobuf's
default pool: a client library in the same process (tritonclient.grpc) registers the same protocol's
names there, and two files defining `inference.ModelInferRequest` in one pool are an error.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def serialized_descriptor() -> bytes:
    """inference.proto compiled by protoc: its FileDescriptorProto, serialized."""
    from google.protobuf import descriptor_pb2
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "set.pb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--descriptor_set_out={out}",
                        "inference.proto"], check=True)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return files[0].SerializeToString(deterministic=True)


def module_text(data: bytes) -> str:
    lines = [data[i:i + 60] for i in range(0, len(data), 60)]
    body = "\n".join(f"    {line!r}" for line in lines)
    return ('"""inference.proto, compiled: written by service/protocol/generate.py (make protocol); do not edit."""\n\n'
            f"DESCRIPTOR = (\n{body}\n)\n")


if __name__ == "__main__":
    (HERE / "descriptor.py").write_text(module_text(serialized_descriptor()))
    print(f"wrote {HERE / 'descriptor.py'}")
