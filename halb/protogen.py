"""Regenerates the protobuf/gRPC modules in halb/v1/ from proto/halb/v1/*.proto.

    ./dev proto        (or: python -m halb.protogen [--out DIR])

Generated files are never edited by hand; tests/unit/test_proto_generated.py regenerates
into a temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "halb" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    files = proto_files()
    if not files:
        raise SystemExit("no .proto files under proto/halb/v1")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}"]
    args += [str(f.relative_to(PROTO_DIR)) for f in files]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    pkg = out / "halb" / "v1"
    (pkg / "__init__.py").write_text('"""Generated from proto/halb/v1 by halb.protogen; do not edit."""\n')
    return sorted(p for p in pkg.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT), help="root to write halb/v1/ under")
    a = ap.parse_args(argv)
    for p in generate(Path(a.out)):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
