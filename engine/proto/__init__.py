"""The Python code generated from ``proto/mimetic/v1/*.proto``, checked in next to this file.

    from engine.proto.mimetic.v1 import mimetic_pb2, mimetic_pb2_grpc
    python -m engine.proto          # regenerate after editing a .proto (tests/test_proto.py checks it was)

protoc writes imports between generated modules as ``from mimetic.v1 import x_pb2`` (the .proto's
own path), which would need a top-level ``mimetic`` package. The only change made to protoc's output
is that prefix, rewritten to ``engine.proto.mimetic.v1``, so the descriptors keep their canonical file
names (``mimetic/v1/mimetic.proto``) for reflection and other languages.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PACKAGE_DIR = Path(__file__).resolve().parent
_IMPORT = re.compile(rb"^from mimetic\.v1 import ", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.glob("mimetic/v1/*.proto"))


def generate(out_dir: Path = PACKAGE_DIR, root: Path = PROTO_ROOT) -> list[Path]:
    """Run grpcio-tools' protoc on every .proto under ``root``; write ``out_dir/mimetic/v1/*_pb2*.py(i)``.

    Returns the files written. Raises RuntimeError with protoc's message if it fails.
    """
    import grpc_tools
    from grpc_tools import protoc

    includes = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    import google.rpc  # googleapis-common-protos ships google/rpc/status.proto next to its module

    googleapis = Path(google.rpc.__path__[0]).parents[1]
    sources = proto_files(root)
    if not sources:
        raise RuntimeError(f"no .proto files under {root}/mimetic/v1")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc", f"-I{root}", f"-I{includes}", f"-I{googleapis}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
            *(str(source.relative_to(root)) for source in sources),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))} (its message is above)")
        written = []
        target = out_dir / "mimetic" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for package in (out_dir / "mimetic", target):
            (package / "__init__.py").touch()
        for path in sorted((Path(tmp) / "mimetic" / "v1").iterdir()):
            (target / path.name).write_bytes(_IMPORT.sub(b"from engine.proto.mimetic.v1 import ", path.read_bytes()))
            written.append(target / path.name)
        return written


def main() -> None:
    for path in generate():
        print(path)


__all__ = ["generate", "main", "proto_files"]
