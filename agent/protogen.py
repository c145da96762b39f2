"""Set-up helper: compile the protobuf schemas in `proto/` into `agent/_proto/` (run by `make setup`).

Generated code is never committed: it must match the protobuf runtime that pip installed, so it is
produced on the machine, by the grpcio-tools version pinned next to that runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent / "proto"
OUT_DIR = PACKAGE_DIR / "_proto"


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR) -> list[Path]:
    from grpc_tools import protoc  # set-up dependency only; the running agent never imports it

    sources = sorted(proto_dir.glob("*.proto"))
    if not sources:
        raise SystemExit(f"protogen: no .proto files in {proto_dir}")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    status = protoc.main([*args, *(str(s) for s in sources)])
    if status != 0:
        raise SystemExit(f"protogen: protoc failed with status {status}")
    return [out_dir / (s.stem + "_pb2.py") for s in sources]


def main() -> int:
    for path in generate():
        print(f"protogen: wrote {path.relative_to(PACKAGE_DIR.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
