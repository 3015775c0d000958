"""Compare benchmarks/tensorial.py results of two versions of convgap, row by row.

Each row's ``speedup`` (the factorized layer against the dense conv, median of per-round
paired ratios, both timed in the same rounds) cancels the machine's drift between runs, so
the ratio of two versions' speedups is how much faster (> 1) or slower (< 1) the new
version runs that layer. Give one or more JSON files per version (runs alternated A B A B
in time); each row takes the median over a version's files.

    python benchmarks/tensorial_versus.py --old OLD1.json [OLD2.json] --new NEW1.json [...]
                                          [--out results/tensorial_versus.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table


def rows(path: Path) -> dict[tuple, dict]:
    """(channels, size, batch, variant, compression) -> the row, from one results file."""
    d = json.loads(path.read_text())
    out = {}
    for block in d["results"]:
        for r in block["rows"]:
            key = (block["channels"], block["size"], block["batch"], r["variant"],
                   r.get("target_compression"))
            out[key] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, nargs="+", required=True)
    ap.add_argument("--new", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    old, new = [rows(p) for p in args.old], [rows(p) for p in args.new]
    keys = [k for k in new[0] if all(k in r for r in old + new)]
    table = Table(title="tensorial.py, new vs old version (speedup over dense, median of "
                        "each version's runs; new / old > 1: the new version is faster)",
                  title_justify="left")
    for col in ("layer", "batch", "variant", "x", "runs old", "runs new", "speedup old",
                "speedup new", "new / old"):
        table.add_column(col, justify="left" if col in ("layer", "variant") else "right")
    result = []
    for k in keys:
        s_old = statistics.median(r[k]["speedup"] for r in old)
        s_new = statistics.median(r[k]["speedup"] for r in new)
        result.append({"channels": k[0], "size": k[1], "batch": k[2], "variant": k[3],
                       "compression": k[4], "speedup_old": s_old, "speedup_new": s_new,
                       "new_over_old": s_new / s_old,
                       "runs_old": old[0][k].get("runs"), "runs_new": new[0][k].get("runs")})
        table.add_row(f"{k[0]}@{k[1]}", str(k[2]), k[3], str(k[4] or "-"),
                      str(old[0][k].get("runs")), str(new[0][k].get("runs")),
                      f"{s_old:.2f}", f"{s_new:.2f}", f"{s_new / s_old:.3f}")
    console = Console(width=160)
    console.print(table)
    ratios = [r["new_over_old"] for r in result]
    console.print(f"{len(ratios)} rows: median new/old {statistics.median(ratios):.3f}, "
                  f"min {min(ratios):.3f}, max {max(ratios):.3f}")
    if args.out:
        args.out.write_text(json.dumps({"old": [str(p) for p in args.old],
                                        "new": [str(p) for p in args.new],
                                        "rows": result}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
