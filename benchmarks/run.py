"""Run every ``benchmarks/bench_*.py`` module's ``run()`` and print one table.

Each ``run()`` returns rows ``{"benchmark", "metric", "value", "unit", "target", "note"}``.
``python -m benchmarks.run [name ...]`` runs only the named modules (e.g. ``video audio``).
``benchmarks/gpu_rows.py`` (sd15 size on CUDA; one "skipped" row without CUDA) runs last, also as
the name ``gpu``.
Results are also written to ``work/bench_results.json`` for the scale plan.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import benchmarks

ROOT = Path(__file__).resolve().parent.parent


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    cols = ["benchmark", "metric", "value", "unit", "target", "note"]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv: list[str]) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if argv:
        names = [n for n in names if n.removeprefix("bench_") in argv or n in argv]
    rows: list[dict] = []
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            rows.extend(mod.run())
        except Exception:  # a broken benchmark is reported, the others still run
            failed += 1
            traceback.print_exc()
            rows.append({"benchmark": name, "metric": "FAILED", "value": "", "unit": "", "target": "", "note": "see traceback above"})
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", flush=True)
    if not argv or "gpu" in argv or "gpu_rows" in argv:  # sd15-size CUDA rows (a skip row without CUDA)
        print("[bench] gpu_rows ...", flush=True)
        try:
            rows.extend(importlib.import_module("benchmarks.gpu_rows").run())
        except Exception:
            failed += 1
            traceback.print_exc()
            rows.append({"benchmark": "gpu_rows", "metric": "FAILED", "value": "", "unit": "", "target": "", "note": "see traceback above"})
    print()
    print_table(rows)
    out = ROOT / "work" / "bench_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=str))
    print(f"\nresults: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
