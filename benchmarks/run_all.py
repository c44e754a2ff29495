#!/usr/bin/env python3
"""Run every benchmark of iommusim and print the figures beside the baselines (the same code as `iommusim bench`).

python benchmarks/run_all.py                 # 2^14 .. 2^20 pages, 5 repeats, every registered vendor
python benchmarks/run_all.py --quick         # tiny sizes: a smoke test
python benchmarks/run_all.py --sizes 20 --vendor vtd --only bulk,translate --json vtd.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iommusim.bench import GROUPS, make_options, render, run_benchmarks
from iommusim.errors import InvalidArgument


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vendor", action="append", help="only this vendor (repeatable)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (2^8, 2^10) and 3 repeats")
    ap.add_argument("--sizes", help="powers of two, comma-separated (default 14,16,18,20)")
    ap.add_argument("--repeats", type=int, help="timed runs per figure and size (default 5)")
    ap.add_argument("--only", action="append", default=[], help=f"figures or groups: {', '.join(GROUPS)}, or a key")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args(argv)
    try:
        opts = make_options(
            quick=args.quick, sizes=args.sizes, repeats=args.repeats, only=args.only, vendors=args.vendor
        )
    except InvalidArgument as exc:
        ap.error(exc.message)
    result = run_benchmarks(opts, progress=lambda text: print(text, file=sys.stderr, flush=True))
    render(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
