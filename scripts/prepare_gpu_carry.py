"""Pack the training photos and the benchmark sets small enough to travel with the repository.

    python3 scripts/prepare_gpu_carry.py .carry [--photos DIR] [--bench DIR] [--sets Set5,Set14,B100]

Writes ``DIR/train_photos/`` and ``DIR/benchmark/<Set>/HR/``: every RGB image re-encoded as
lossless WebP when that is smaller and decodes to the same pixels (checked, image by image);
other images (greyscale, or not smaller) are copied as they are. The benchmark LR folders are
left out: :class:`distillsr.data.BenchmarkSet` makes a missing LR image from the HR one with
MATLAB-compatible bicubic, the same bits as the LR files. Existing outputs are kept, so a second
call only finishes what is missing. Exits non-zero when the folder ends up above ``--limit-mib``.
``.carry/`` is ignored by git; ``benchmarks/gpu.py`` and ``scripts/gpu_train_sprint.py`` read it.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

from distillsr.data.benchmark import IMAGE_EXTENSIONS, read_image  # noqa: E402
from distillsr.io import atomic_write  # noqa: E402

SHARED_DATA = HERE.parent.parent / "shared" / "data"


def pack_image(src: Path, dst_dir: Path) -> Path:
    """Write ``src`` into ``dst_dir`` as lossless WebP (same pixels, smaller) or as it is."""
    from PIL import Image
    webp = dst_dir / (src.stem + ".webp")
    same = dst_dir / src.name
    for done in (webp, same):
        if done.is_file():
            return done
    pixels = read_image(src)
    if pixels.shape[2] == 3:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="WEBP", lossless=True, quality=100, method=2, exact=True)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as im:
            back = np.asarray(im.convert("RGB"))
        if len(data) < src.stat().st_size and np.array_equal(back, pixels):
            return atomic_write(webp, lambda tmp: Path(tmp).write_bytes(data))
    return atomic_write(same, lambda tmp: shutil.copyfile(src, tmp))


def images(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to fill (e.g. .carry)")
    p.add_argument("--photos", type=Path, default=SHARED_DATA / "train_photos", help="HR training photos")
    p.add_argument("--bench", type=Path, default=SHARED_DATA / "benchmark", help="benchmark root (<Set>/HR)")
    p.add_argument("--sets", default="Set5,Set14,B100")
    p.add_argument("--limit-mib", type=float, default=56.0,
                   help="fail when the folder is larger (the repository itself takes about 7 MiB of 64)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    jobs = []
    if not args.photos.is_dir():
        p.error(f"--photos {args.photos}: no such folder")
    jobs += [(f, args.out / "train_photos") for f in images(args.photos)]
    for name in [s for s in args.sets.split(",") if s]:
        hr = args.bench / name / "HR"
        if not hr.is_dir():
            p.error(f"--bench {args.bench}: no {name}/HR folder")
        jobs += [(f, args.out / "benchmark" / name / "HR") for f in images(hr)]
    for _, d in jobs:
        d.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        written = list(pool.map(pack_image, *zip(*jobs)))
    webp = sum(w.suffix == ".webp" for w in written)
    total = folder_bytes(args.out)
    print(f"{args.out}: {len(written)} images ({webp} as lossless WebP), {total / 2 ** 20:.1f} MiB")
    for sub in sorted(d for d in args.out.rglob("*") if d.is_dir() and d.name in ("train_photos", "HR")):
        print(f"  {sub.relative_to(args.out)}: {folder_bytes(sub) / 2 ** 20:.1f} MiB")
    if total > args.limit_mib * 2 ** 20:
        print(f"error: {args.out} is {total / 2 ** 20:.1f} MiB, above --limit-mib {args.limit_mib}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
