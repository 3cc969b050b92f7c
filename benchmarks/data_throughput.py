"""Training data loader: start-up time and samples/s at 1k and 100k records, side by side.

Both sets are WebDataset tar shards of the same tiny JPEG pairs (32x32 by default, 250 records per
shard), so a sample costs the same to decode in both; only the size of the set differs. Each set is
read by the training loader (shards listed without opening them, image sizes read from the headers
for aspect buckets, a shuffle buffer, DataLoader workers) exactly as ``x2edit-train`` reads it. The
loader work per batch should not depend on the set's size, so the ratio should be about 1.

Printed per set: records, shards, start-up seconds (listing the shards up to the first batch, which
comes once a worker's shuffle buffer is full: a fixed number of image headers, whatever the set) and
samples/s over the measured batches, and the CPU milliseconds per sample of the same batches formed
and decoded in one process (medians of rounds that alternate between the sets), then the 100k / 1k
ratios. On a machine shared with other work the wall-clock rate is noisy; the CPU time is steadier.

    python benchmarks/data_throughput.py                 # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from train.data import EditStream, list_shards, make_loader  # noqa: E402


def _jpegs(count: int, side: int) -> list[bytes]:
    """A pool of distinct small JPEGs (wide, square and tall) reused across records."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        h, w = [(side, side), (side, side * 3 // 2), (side * 3 // 2, side)][i % 3]
        arr = (torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_set(folder: str, records: int, per_shard: int, pool: list[bytes]) -> float:
    """Tar shards of ``records`` samples; returns the seconds spent writing them."""
    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    for s in range(0, records, per_shard):
        with tarfile.open(os.path.join(folder, f"shard-{s // per_shard:05d}.tar"), "w") as tf:
            for i in range(s, min(s + per_shard, records)):
                meta = {"task": 1 + i % 15, "instruction": "编辑", "instruction_en": f"edit sample {i}"}
                add(tf, f"{i:08d}.json", json.dumps(meta).encode())
                add(tf, f"{i:08d}.1.0.jpg", pool[i % len(pool)])
                add(tf, f"{i:08d}.2.jpg", pool[(i * 7 + 3) % len(pool)])
    return time.perf_counter() - t0


def measure(folder: str, args) -> dict:
    t0 = time.perf_counter()
    shards = list_shards([os.path.join(folder, "*.tar")])
    stream = EditStream(
        shards,
        args.batch,
        args.resolution,
        True,
        seed=0,
        shuffle_buffer=args.buffer,
        num_workers=args.workers,
    )
    it = iter(make_loader(stream))
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(args.warmup):
        next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        n += len(next(it)["keys"])
    seconds = time.perf_counter() - t1
    del it
    # The same batches formed and decoded in this process: CPU time per sample, which the other
    # programs on a shared machine disturb much less than the wall clock.
    it = iter(EditStream(shards, args.batch, args.resolution, True, seed=0, shuffle_buffer=args.buffer))
    for _ in range(args.warmup + 1):
        next(it)
    c0 = time.process_time()
    m = sum(len(next(it)["keys"]) for _ in range(args.batches))
    cpu_ms = (time.process_time() - c0) / m * 1000
    return {
        "shards": len(shards),
        "startup": startup,
        "samples_per_s": n / seconds,
        "samples": n,
        "cpu_ms": cpu_ms,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000], help="records per set")
    ap.add_argument("--per-shard", type=int, default=250, help="records per tar shard")
    ap.add_argument("--side", type=int, default=32, help="image side in pixels")
    ap.add_argument("--resolution", type=int, default=32, help="panel side of the training diptych")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--buffer",
        type=int,
        default=400,
        help="shuffle buffer per loader worker (filled before the first batch)",
    )
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--warmup", type=int, default=20, help="batches after the first, not measured")
    ap.add_argument("--batches", type=int, default=200, help="measured batches per round")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per set, alternating sets")
    ap.add_argument("--keep", default="", help="folder to write the sets to and keep (default: temporary)")
    args = ap.parse_args(argv)

    work = args.keep or tempfile.mkdtemp(prefix="x2edit-data-bench-")
    pool = _jpegs(64, args.side)
    rows = []
    try:
        for size in args.sizes:
            folder = os.path.join(work, f"set-{size}")
            made = 0.0
            if not os.path.isdir(folder):
                made = write_set(folder, size, args.per_shard, pool)
            rows.append({"records": size, "written": made, "folder": folder, "runs": []})
        for _ in range(args.rounds):
            for r in rows:
                r["runs"].append(measure(r["folder"], args))
        for r in rows:
            runs = r.pop("runs")
            r.update(runs[0])
            r["startup"] = statistics.median(x["startup"] for x in runs)
            r["samples_per_s"] = statistics.median(x["samples_per_s"] for x in runs)
            r["cpu_ms"] = statistics.median(x["cpu_ms"] for x in runs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"loader: batch {args.batch}, {args.workers} workers, shuffle buffer {args.buffer}, "
        f"{args.side}px JPEG pairs -> {args.resolution}px panels, aspect buckets from image headers"
    )
    print(
        f"{'records':>9} {'shards':>7} {'write s':>8} {'start-up s':>11} {'samples/s':>10} {'measured':>9} "
        f"{'CPU ms/sample (1 process)':>26}"
    )
    for r in rows:
        print(
            f"{r['records']:>9} {r['shards']:>7} {r['written']:>8.1f} {r['startup']:>11.3f} "
            f"{r['samples_per_s']:>10.1f} {r['samples']:>9} {r['cpu_ms']:>26.3f}"
        )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        speed, startup = b["samples_per_s"] / a["samples_per_s"], b["startup"] / a["startup"]
        print(
            f"{b['records']} vs {a['records']} records: samples/s ratio {speed:.2f}, start-up ratio "
            f"{startup:.2f}, CPU per sample ratio {b['cpu_ms'] / a['cpu_ms']:.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
