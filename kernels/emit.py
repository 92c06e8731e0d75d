"""Write out the generated Triton source of one variant, for a person to read, diff or edit.

    python -m kernels.emit gemm --shape M=64,N=4096,K=4096 --dtype bfloat16
    python -m kernels.emit gemm --shape M=1,N=14336,K=4096 --config '{"variant": "splitk", ...}' -o v.py
    python -m kernels.emit gemm --shape M=64,N=4096,K=4096 --list-configs

Without ``--config`` the family's default config is used. ``--list-configs`` prints the valid
configs (one JSON object per line) instead of source.
"""
from __future__ import annotations

import argparse
import json
import sys

import kernels


def parse_shape(text: str) -> dict:
    """``"M=64,N=4096,causal=true"`` -> ``{"M": 64, "N": 4096, "causal": True}``."""
    shape: dict = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"shape item {item!r} is not KEY=VALUE")
        low = value.strip().lower()
        shape[key.strip()] = True if low == "true" else False if low == "false" else int(value)
    return shape


def add_variant_arguments(parser: argparse.ArgumentParser, dtype: str) -> None:
    """The arguments that name one variant: family, shape, dtype (default ``dtype``) and config."""
    parser.add_argument("family", choices=kernels.family_names())
    parser.add_argument("--shape", required=True, help="comma-separated KEY=VALUE, e.g. M=64,N=4096,K=4096")
    parser.add_argument("--dtype", default=dtype, choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--config", help="config as JSON (default: the family's default config)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.emit", description=__doc__.split("\n")[0])
    add_variant_arguments(parser, "float16")
    parser.add_argument("--list-configs", action="store_true", help="print every valid config instead")
    parser.add_argument("-o", "--output", help="write the source here instead of stdout")
    args = parser.parse_args(argv)
    fam = kernels.get_family(args.family)
    try:
        shape = parse_shape(args.shape)
        if args.list_configs:
            for cfg in fam.configs(shape, args.dtype):
                print(json.dumps(cfg))
            return 0
        config = json.loads(args.config) if args.config else fam.default_config(shape, args.dtype)
        source = fam.emit(shape, args.dtype, config)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        parser.error(str(e))
    if args.output:
        with open(args.output, "w") as f:
            f.write(source)
        print(f"wrote {args.output} ({fam.name}, {shape}, {args.dtype}, {json.dumps(config)})", file=sys.stderr)
    else:
        sys.stdout.write(source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
