"""``distillsr weights``: the authors' released checkpoints by name (list, pull, add, verify)."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("weights", help="list, pull, add and verify released weights",
                       description="The authors' released checkpoints by name: downloaded on request into "
                       "the cache (DISTILLSR_CACHE, default ~/.cache/distillsr), checked against their "
                       "sha256 and converted once to safetensors. DISTILLSR_WEIGHTS_MIRROR=URL replaces "
                       "https://github.com in every download URL.")
    ws = p.add_subparsers(dest="weights_command", metavar="ACTION")
    ls = ws.add_parser("list", help="the release table and what is on this machine")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--markdown", action="store_true",
                    help="a Markdown table of every name by scale, best Set5 first (as in the README)")
    ls.set_defaults(action=run_list)
    pl = ws.add_parser("pull", help="download, check and convert a release")
    pl.add_argument("name", help="release name (see `distillsr weights list`)")
    pl.add_argument("--scale", type=int, nargs="+", required=True, help="one or more scales")
    pl.add_argument("--force", action="store_true", help="download and convert again")
    pl.set_defaults(action=run_pull)
    ad = ws.add_parser("add", help="add a release file fetched by hand (checked like a download)")
    ad.add_argument("name", help="release name")
    ad.add_argument("file", help="the file, as the release's URL serves it")
    ad.add_argument("--scale", type=int, required=True)
    ad.set_defaults(action=run_add)
    vf = ws.add_parser("verify", help="check every weights file here against its card and release hash")
    vf.set_defaults(action=run_verify)
    p.set_defaults(func=lambda args: args.action(args) if getattr(args, "action", None) else
                   (p.print_help(), 2)[1])


def _err(msg) -> int:
    print(f"distillsr weights: error: {msg}", file=sys.stderr)
    return 2


def run_list(args) -> int:
    from ..releases import cache_dir
    rows = release_rows()
    if args.json:
        print(json.dumps([{"name": r.name, "scale": r.scale, "arch": r.arch, "url": r.url, "sha256": r.sha256,
                           "size": r.size, "licence": r.licence, "published": r.published,
                           "measured": r.measured, "status": status} for r, status in rows], indent=1))
        return 0
    if args.markdown:
        print("\n".join(markdown_table()))
        return 0
    print(f"Released weights (cache: {cache_dir()}); PSNR on Y, measured here / published:")
    for line in release_lines(rows):
        print("  " + line)
    print("Pull one with `distillsr weights pull NAME --scale S`; `--model NAME` in upscale, eval, export "
          "and profile pulls on first use.")
    return 0


def release_lines(rows):
    """The release table as text lines: [(Release, status)] -> lines."""
    from ..pretrained import _scores, format_table
    return format_table(("name", "scale", "arch", "Set5 meas / pub", "Set14 meas / pub", "B100 meas / pub",
                         "status"),
                        [(r.name, f"x{r.scale}", r.arch, *_scores(r.measured_psnr, r.published_psnr), status)
                         for r, status in rows])


def release_rows():
    """[(Release, 'bundled' | 'cached' | 'not pulled')] for every row of the release table."""
    from ..pretrained import list_pretrained
    from ..releases import list_releases
    present = {(e.name, e.scale): e for e in list_pretrained() if e.installed}
    return [(r, "not pulled" if (r.name, r.scale) not in present else
             "bundled" if present[(r.name, r.scale)].bundled else "cached") for r in list_releases()]


def markdown_table():
    """Every release and every bundled name, by scale and best Set5 first, as Markdown lines."""
    from ..pretrained import _scores, list_pretrained
    from ..releases import find_release
    rows = [(r.scale, r.set5, r.name, _scores(r.measured_psnr, r.published_psnr),
             "bundled" if status == "bundled" else f"`distillsr weights pull {r.name} --scale {r.scale}`")
            for r, status in release_rows()]
    rows += [(e.scale, e.set5, e.name, _scores(e.psnr, e.published), "bundled")
             for e in list_pretrained() if e.bundled and find_release(e.name) is None]
    rows.sort(key=lambda r: (r[0], -(r[1] or 0.0), r[2]))
    lines = ["| scale | name | Set5 | Set14 | B100 | get it |", "|---|---|---|---|---|---|"]
    lines += [f"| x{s} | `{name}` | {' | '.join(cells)} | {how} |" for s, _, name, cells, how in rows]
    return lines


def run_pull(args) -> int:
    from ..pretrained import PretrainedError
    from ..releases import pull
    failed = 0
    for s in args.scale:
        try:
            entry = pull(args.name, s, force=args.force)
        except PretrainedError as e:
            print(f"distillsr weights: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{entry.name} x{entry.scale}: ready ({entry.file})")
    return 1 if failed else 0


def run_add(args) -> int:
    from ..pretrained import PretrainedError
    from ..releases import add
    try:
        entry = add(args.name, args.file, args.scale)
    except PretrainedError as e:
        return _err(e)
    print(f"{entry.name} x{entry.scale}: added ({entry.file})")
    return 0


def run_verify(args) -> int:
    from ..releases import verify
    problems = verify()
    print(f"{'all weights files check out' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
