"""Run the fuzz targets of tests/test_fuzz.py for a while and print a table of cases per
target and the failures found.

    python benchmarks/fuzz.py --minutes 10

The time is shared evenly by the targets. Each target runs batches of Hypothesis cases with
fresh random seeds (no example database) until its share is used; a batch that finds a
failure reports it (after Hypothesis has shrunk it) and the next batch goes on. Every case
has the same deadline as in CI; the growth of the process's peak memory is shown per target.
"""
from __future__ import annotations

import argparse
import warnings
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import fuzz_targets as ft  # noqa: E402


def targets(folder: Path):
    """name -> (strategy, check(case) -> outcome label)."""
    sentinel = folder / "sentinel"
    st_seed = ft.safetensors_seed(folder)
    torch_seeds = ft.torch_seeds()
    return {
        "read_image: random bytes": (ft.random_bytes, lambda d: ft.check_read(d, folder / "case.img")),
        "read_image: mutated PNG/JPEG/WebP/TIFF/BMP": (ft.mutated_image(),
                                                       lambda d: ft.check_read(d, folder / "case.img")),
        "write_image: round trips": (ft.image_to_write(), lambda c: ft.check_roundtrip(c, folder)),
        "load_model: mutated safetensors": (ft.safetensors_edit(st_seed),
                                            lambda d: ft.check_load(d, folder / "case.safetensors", sentinel)),
        "load_model: mutated torch zip / pickle": (ft.torch_file_edit(torch_seeds, sentinel),
                                                   lambda d: ft.check_load(d, folder / "case.pt", sentinel)),
        "load_config: random overrides": (ft.overrides(), ft.check_config),
    }


def run_target(strategy, check, seconds: float, batch: int):
    outcomes: Counter = Counter()
    failures = []
    end = time.monotonic() + seconds

    def case(x):
        outcomes[check(x)] += 1

    while time.monotonic() < end:
        test = settings(max_examples=batch, database=None, deadline=timedelta(seconds=10),
                        suppress_health_check=list(HealthCheck))(given(strategy)(case))
        test = seed(random.getrandbits(64))(test)
        try:
            test()
        except Exception as e:  # a falsified property: keep it, go on with a new seed
            outcomes["failed"] += 1
            first = (str(e).splitlines() or [""])[0]
            notes = " ".join(getattr(e, "__notes__", []))
            failures.append(f"{type(e).__name__}: {first} {notes}".strip()[:400])
    return outcomes, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0, help="total time for all targets")
    ap.add_argument("--batch", type=int, default=200, help="cases per Hypothesis run")
    ap.add_argument("--only", default="", help="run only the targets whose name contains this")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # decoders warn about the broken files they are fed
    with tempfile.TemporaryDirectory() as d:
        table = {k: v for k, v in targets(Path(d)).items() if args.only in k}
        share = args.minutes * 60 / len(table)
        rows, all_failures = [], []
        for name, (strategy, check) in table.items():
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.monotonic()
            outcomes, failures = run_target(strategy, check, share, args.batch)
            spent = time.monotonic() - t0
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
            cases = sum(n for k, n in outcomes.items() if k != "failed")
            detail = ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items()) if k != "failed")
            rows.append((name, cases, detail, len(failures), spent, grown))
            all_failures += [(name, f) for f in failures]
            print(f"{name}: {cases} cases in {spent:.0f} s, {len(failures)} failures", file=sys.stderr, flush=True)
    print(f"\nfuzz run: {args.minutes:g} min in all, {args.batch} cases per Hypothesis run\n")
    print("| target | cases | outcomes | failures | s | peak memory growth |")
    print("|---|---:|---|---:|---:|---:|")
    for name, cases, detail, nfail, spent, grown in rows:
        print(f"| {name} | {cases} | {detail} | {nfail} | {spent:.0f} | {grown:.0f} MiB |")
    total = sum(r[1] for r in rows)
    print(f"| all | {total} | | {len(all_failures)} | | |")
    for name, f in all_failures:
        print(f"\nFAILURE in {name}: {f}")
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
