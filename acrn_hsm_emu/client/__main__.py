"""``python -m acrn_hsm_emu.client --include-dir``: where acrn_hsm_emu.h is installed."""

from __future__ import annotations

import argparse
import sys

from acrn_hsm_emu.client.extension import header_path, include_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m acrn_hsm_emu.client", description=__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--include-dir", action="store_true", help="print the directory for cc -I")
    g.add_argument("--header", action="store_true", help="print the path of acrn_hsm_emu.h")
    args = p.parse_args(argv)
    print(include_dir() if args.include_dir else header_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
