"""Two (or more) versions of the vector-heavy OpenCL kernels side by side on PoCL, in one
process: the tiled f32 GEMM (matmul_f32_f32_tiled) at the MiniLM FFN shape and the Q4_1
matmul (matmul_q4_1_q8_1, -DROWS=8 as the host builds it) at SmolLM2 shapes.

"old" is the kernel file and common.h at a git revision (`git show REV:kernels/...`, default
HEAD), "new" the working tree; `--extra name=path` adds candidate files (with the working
tree's common.h). Versions run alternately (A B A B ...), each measurement a batch of launches
after a warm-up, and the report gives medians and the ratio of each version to "old". Outputs
are compared with "old" bit for bit (GELU's vector erf may differ in the last bits: its largest
difference is printed instead).

PoCL picks its kernel library per process: run once per variant, e.g.
    .venv/bin/python bench/opencl_vector_widths.py --old e6d25fd
    POCL_KERNELLIB_NAME=avx2 .venv/bin/python bench/opencl_vector_widths.py --old e6d25fd
(e6d25fd: the kernels before the <= 128-bit-calls rewrite). Builds are without -Werror (the
old kernels warn on hosts without AVX-512).

Measured (2-vCPU AMD EPYC guest with AVX-512, load average 3-5 from other sessions; time
new/old, medians of 11 alternating rounds): default library (skylake-avx512, where the
kernels keep their 16-wide vectors) tiled 1.05 / 0.98 (act 0 / GELU), Q4_1 m=1/16/656
1.02 / 1.06 / 0.97, i.e. the same code within noise; avx2 (haswell) tiled 0.89 / 0.91, Q4_1
0.79 / 0.78 / 0.73. Forcing the 128-bit forms on the AVX-512 library: tiled 2.3-2.7x,
Q4_1 1.2-1.7x slower, hence the per-target widths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyopencl as cl

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
sys.path.insert(0, str(ROOT / "tests" / "kernels"))
import cl_reference as R  # noqa: E402

OPTIONS = ["-cl-std=CL1.2", "-cl-fp32-correctly-rounded-divide-sqrt"]


def source(name: str, rev: str | None, path: Path | None = None) -> str:
    """kernels/<name>.cl at `rev` (or the working tree, or `path`), common.h spliced in."""
    if rev is None:
        text = (path or KERNELS / f"{name}.cl").read_text()
        common = (KERNELS / "common.h").read_text()
    else:
        show = lambda f: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/{f}"], check=True, capture_output=True, text=True).stdout
        text, common = show(f"{name}.cl"), show("common.h")
    return text.replace('#include "common.h"', common)


def timed(queue, launch, reps: int) -> float:
    """Seconds per launch over a batch of `reps` launches."""
    queue.finish()
    t = time.perf_counter()
    for _ in range(reps):
        launch()
    queue.finish()
    return (time.perf_counter() - t) / reps


def compare(versions: dict, launchers: dict, read, rounds: int) -> dict:
    """(median, min, max) seconds per launch for each version, rounds alternating; each
    measurement a batch of launches of about 0.1 s."""
    reps = {}
    for name in versions:  # warm-up (and the first launch's allocations), batch size
        launchers[name]()
        reps[name] = max(3, min(1000, int(0.1 / timed(read.queue, launchers[name], 2))))
    times = {name: [] for name in versions}
    for _ in range(rounds):
        for name in versions:
            times[name].append(timed(read.queue, launchers[name], reps[name]))
    return {name: (statistics.median(ts), min(ts), max(ts)) for name, ts in times.items()}


class Reader:
    def __init__(self, queue):
        self.queue = queue

    def __call__(self, buf, shape):
        out = np.empty(shape, np.float32)
        cl.enqueue_copy(self.queue, out, buf)
        self.queue.finish()
        return out


def report(title: str, med: dict, outputs: dict, work: float, unit: str, exact: bool) -> None:
    base = med["old"][0]
    ref = outputs["old"]
    print(f"  {title}")
    for name, (t, lo, hi) in med.items():
        out = outputs[name]
        if np.array_equal(out.view(np.uint32), ref.view(np.uint32)):
            same = "same bits"
        else:
            diff = float(np.nanmax(np.abs(out.astype(np.float64) - ref)))
            same = f"{'BITS DIFFER' if exact else 'differs'} (max |diff| {diff:.3g})"
        print(f"    {name:>10}: {t * 1e3:8.3f} ms (range {lo * 1e3:.3f}-{hi * 1e3:.3f})  {work / t / 1e9:7.2f} {unit}  time/old {t / base:5.3f}  {same}")


def bench_tiled(ctx, queue, versions, rounds, rng):
    m, n, k = 614, 1536, 384
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    mf = cl.mem_flags
    bx, bw, bb = (cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=a) for a in (x, w, b))
    progs = {name: cl.Kernel(cl.Program(ctx, src).build(options=OPTIONS), "matmul_f32_f32_tiled") for name, src in versions.items()}
    gsize = (-(-n // 64) * 4, -(-m // 64) * 8)
    read = Reader(queue)
    for act in (0, 1):
        ys = {name: cl.Buffer(ctx, mf.READ_WRITE, m * n * 4) for name in versions}
        launch = {
            name: (lambda kern=kern, y=ys[name]: kern(queue, gsize, (4, 8), bx, bw, bb, y, np.uint32(n), np.uint32(k), np.uint32(act), np.uint32(m)))
            for name, kern in progs.items()
        }
        med = compare(versions, launch, read, rounds)
        outs = {name: read(ys[name], (m, n)) for name in versions}
        report(f"matmul_f32_f32_tiled m={m} n={n} k={k} bias act={act}", med, outs, 2.0 * m * n * k, "GFLOP/s", exact=act == 0)


def bench_q4_1(ctx, queue, versions, rounds, rng):
    n, k, rows = 1536, 576, 8
    nb = k // 32
    w = R.random_q4_1(rng, n, k)
    mf = cl.mem_flags
    bw = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=w)
    progs = {
        name: cl.Kernel(cl.Program(ctx, src).build(options=OPTIONS + [f"-DROWS={rows}"]), "matmul_q4_1_q8_1") for name, src in versions.items()
    }
    read = Reader(queue)
    for m in (1, 16, 656):
        qs = rng.integers(-127, 128, (m, k), dtype=np.int8)
        d = R.random_f16_scales(rng, (m, nb)).astype(np.float32)
        s = qs.reshape(m, nb, 32).astype(np.float32).sum(axis=2)
        scales = np.stack([d, d * s], axis=2).astype(np.float32)
        sums = R.f16_round(d * s)
        bq, bs, bsum = (cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a)) for a in (qs, scales, sums))
        ys = {name: cl.Buffer(ctx, mf.READ_WRITE, m * n * 4) for name in versions}
        gsize = (n, -(-m // rows))
        launch = {
            name: (lambda kern=kern, y=ys[name]: kern(queue, gsize, None, bw, bq, bs, bsum, y, np.uint32(n), np.uint32(k), np.uint32(m)))
            for name, kern in progs.items()
        }
        med = compare(versions, launch, read, rounds)
        outs = {name: read(ys[name], (m, n)) for name in versions}
        report(f"matmul_q4_1_q8_1 ROWS={rows} m={m} n={n} k={k}", med, outs, 2.0 * m * n * k, "GOP/s", exact=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="HEAD", help="git revision of the old kernels (default HEAD)")
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds (median over them)")
    ap.add_argument("--only", choices=["tiled", "q4_1"], help="one kernel only")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH", help="another version of the kernel file")
    ap.add_argument("--no-new", action="store_true", help="leave out the working tree's version")
    args = ap.parse_args()

    dev = [d for p in cl.get_platforms() for d in p.get_devices()][0]
    ctx = cl.Context([dev])
    queue = cl.CommandQueue(ctx)
    print(f"device {dev.name} ({dev.platform.name}); POCL_KERNELLIB_NAME={os.environ.get('POCL_KERNELLIB_NAME', '(unset)')}; "
          f"old = {args.old}; rounds {args.rounds}; load average {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(1)
    for name, file, fn in (("tiled", "matmul_f32_f32_tiled", bench_tiled), ("q4_1", "matmul_q4_1_q8_1", bench_q4_1)):
        if args.only and args.only != name:
            continue
        versions = {"old": source(file, args.old)}
        if not args.no_new:
            versions["new"] = source(file, None)
        for extra in args.extra:
            label, path = extra.split("=", 1)
            if file in Path(path).name or args.only:
                versions[label] = source(file, None, Path(path))
        fn(ctx, queue, versions, args.rounds, rng)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
