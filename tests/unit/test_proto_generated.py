"""The generated modules in halb/v1 must be exactly what protoc makes from proto/halb/v1."""

from pathlib import Path

import pytest

from halb import protogen

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto_files(tmp_path):
    assert protogen.proto_files(), "no .proto files under proto/halb/v1"
    generated = protogen.generate(tmp_path)
    committed_dir = ROOT / "halb" / "v1"
    names = sorted(p.name for p in generated)
    assert names == sorted(p.name for p in committed_dir.iterdir()
                           if p.is_file() and p.suffix in (".py", ".pyi")), \
        "halb/v1 holds other files than protoc makes: run ./dev proto"
    for p in generated:
        assert (committed_dir / p.name).read_bytes() == p.read_bytes(), \
            f"halb/v1/{p.name} differs from what proto/ generates: run ./dev proto (never edit it by hand)"
