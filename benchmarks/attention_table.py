"""Fill soflow_fast/attention_table.json (what `attention: auto` picks per device class) from a GPU run:

    python benchmarks/gpu_suite.py --stages attention --out gpu_out     # on the GPU (XL/2 shapes: head dim 72)
    python benchmarks/attention_table.py gpu_out/attention.json         # adds or replaces that device class's entry

The entry is the implementation with the least attention time per step (soflow_fast.attention.fastest_from_suite).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from soflow_fast.attention import TABLE_PATH, fastest_from_suite, load_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite_json", help="gpu_suite's OUT/attention.json")
    ap.add_argument("--table", default=str(TABLE_PATH), help="the table to update (default: the package's)")
    args = ap.parse_args(argv)
    cls, entry = fastest_from_suite(json.loads(Path(args.suite_json).read_text()))
    table = {**load_table(Path(args.table)), cls: entry}
    Path(args.table).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{cls}: {entry['backend']} ({entry['measured']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
