"""Standalone check + benchmark of csrc/cpu/dot_argmax.cpp (not part of the pytest suite).

    python tests/cpp/dot_argmax_check.py            # checks + timing
    python tests/cpp/dot_argmax_check.py --no-bench # checks only

Builds the kernel with a tiny pybind wrapper (tests/cpp/dot_argmax_binding.cpp) and no
-m flags, compares it with a float64 reference on many shapes (tiny, odd d, n not a
multiple of the panel width, exact ties, zero and NaN rows, several task splits), then
times m = n = 2450, d = 3584 against torch.mm in bf16 and fp32.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEG_INF = float("-inf")


def build():
    return load(
        name="g2tr_dot_argmax_check",
        sources=[
            os.path.join(ROOT, "tests", "cpp", "dot_argmax_binding.cpp"),
            os.path.join(ROOT, "csrc", "cpu", "dot_argmax.cpp"),
        ],
        extra_include_paths=[os.path.join(ROOT, "csrc", "cpu")],
        # The package's flags (setup.py). -fopenmp matters: at::parallel_for is inlined
        # from ATen headers and silently runs serially without it.
        extra_cflags=["-O3", "-fopenmp", "-std=c++20"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def inv_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / max(|x|, eps) in fp32, per row (identical rows get identical scales)."""
    return 1.0 / x.float().norm(dim=-1).clamp_min(1e-12)


def run(ext, A, a_rows, B, b_rows, a_scale, b_scale, splits=None, offset=0):
    """A/B: 2-D bf16 (row stride may exceed d); *_rows: int64 index or None."""
    d = A.shape[1] if A.dim() == 2 else 0
    m = a_rows.numel() if a_rows is not None else A.shape[0]
    n = b_rows.numel() if b_rows is not None else B.shape[0]
    packed = ext.pack(B, b_rows, n, d, offset)
    if splits is None:
        splits = [0, m]
    return ext.rows(A, a_rows, m, packed, n, d, a_scale, b_scale, splits)


def reference(Ar, Br, a_scale, b_scale):
    """float64 values, an error bound per value, and the NaN -> -inf ranking key."""
    a, b = Ar.double(), Br.double()
    s = a_scale.double()[:, None] * b_scale.double()[None, :]
    val = (a @ b.T) * s
    d = max(Ar.shape[1], 1)
    # fp32 accumulation of exact products: |error| <= d * u * sum|a_k b_k| (plus the two
    # scale roundings), u = 2^-24.
    bound = (2 * d * 2.0**-24) * (a.abs() @ b.abs().T) * s.abs() + 4 * 2.0**-24 * val.abs()
    key = torch.nan_to_num(val, nan=NEG_INF)
    return val, bound.nan_to_num(nan=0.0), key


class Checker:
    def __init__(self):
        self.failures = 0
        self.cases = 0

    def fail(self, msg):
        self.failures += 1
        if self.failures <= 20:
            print("FAIL:", msg)

    def check(self, tag, idx, val, Ar, Br, a_scale, b_scale):
        """idx/val vs the float64 reference: the pick must be a maximum within rounding."""
        self.cases += 1
        m, n = Ar.shape[0], Br.shape[0]
        if idx.shape != (m,) or val.shape != (m,):
            return self.fail(f"{tag}: output shape")
        if n == 0:
            if m and (idx.ne(0).any() or not torch.all(val == NEG_INF)):
                self.fail(f"{tag}: n == 0 must give idx 0 / -inf")
            return
        ref, bound, key = reference(Ar, Br, a_scale, b_scale)
        for i in range(m):
            j, v = int(idx[i]), float(val[i])
            if not 0 <= j < n:
                return self.fail(f"{tag}: row {i} idx {j} out of [0, {n})")
            best = float(key[i].max())
            if best == NEG_INF:
                if j != 0 or v != NEG_INF:
                    return self.fail(f"{tag}: row {i} nothing wins, got ({j}, {v})")
                continue
            jb = int(key[i].argmax())
            slack = float(bound[i, j] + bound[i, jb])
            if float(key[i, j]) + slack < best:
                return self.fail(f"{tag}: row {i} picked {j} ({float(key[i, j])}) < best {jb} ({best})")
            if abs(v - float(ref[i, j])) > float(bound[i, j]) + 1e-30:
                return self.fail(f"{tag}: row {i} value {v} vs ref {float(ref[i, j])}")


def rand_bf16(rows, d, ld=None, gen=None):
    ld = d if ld is None else ld
    return torch.randn(rows, ld, generator=gen).to(torch.bfloat16)[:, :d]


def random_splits(m, rng):
    cuts = sorted(rng.sample(range(1, m), min(m - 1, rng.randint(0, 6)))) if m > 1 else []
    return [0] + cuts + [m]


def check_random_shapes(ext, ck, rng, gen):
    ds = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 255, 2048, 3584]
    ns = list(range(0, 41)) + [47, 48, 49, 95, 96, 97, 130]
    for case in range(400):
        d = rng.choice(ds)
        m = rng.randint(0, 40) if d < 1000 else rng.randint(0, 20)
        n = rng.choice(ns) if d < 1000 else rng.choice([0, 1, 17, 48, 49, 97])
        lda = d + rng.choice([0, 0, 1, 3])
        ldb = d + rng.choice([0, 0, 1, 2])
        use_a_rows, use_b_rows = rng.random() < 0.4, rng.random() < 0.4
        A = rand_bf16(m + (5 if use_a_rows else 0), d, lda, gen)
        B = rand_bf16(n + (5 if use_b_rows else 0), d, ldb, gen)
        a_rows = torch.randint(0, A.shape[0], (m,), generator=gen) if use_a_rows and A.shape[0] else None
        b_rows = torch.randint(0, B.shape[0], (n,), generator=gen) if use_b_rows and B.shape[0] else None
        Ar = A[a_rows] if a_rows is not None else A[:m]
        Br = B[b_rows] if b_rows is not None else B[:n]
        a_scale, b_scale = inv_norm(Ar), inv_norm(Br)
        if rng.random() < 0.3:  # all values negative: zero-padded columns must not win
            Ar = Ar.abs().neg()
            Br = Br.abs()
            A, a_rows, B, b_rows = Ar.contiguous(), None, Br.contiguous(), None
        idx, val = run(ext, A, a_rows, B, b_rows, a_scale, b_scale, random_splits(m, rng), rng.choice([0, 1]))
        ck.check(f"random#{case} m={m} n={n} d={d}", idx, val, Ar, Br, a_scale, b_scale)


def check_ties(ext, ck, rng, gen):
    """Exact duplicates of B rows, anywhere in panels/lanes: the lowest index must win."""
    for case in range(60):
        d = rng.choice([1, 3, 16, 33, 64, 129, 3584])
        uniq = rng.randint(1, 6)
        n = rng.randint(1, 150)
        U = rand_bf16(uniq, d, gen=gen)
        uid = torch.randint(0, uniq, (n,), generator=gen)
        Br = U[uid].contiguous()
        m = rng.randint(1, 30)
        Ar = rand_bf16(m, d, gen=gen)
        if rng.random() < 0.5:  # duplicated A rows too, at different tile positions
            Ar = Ar[torch.randint(0, m, (m,), generator=gen)].contiguous()
        a_scale, b_scale = inv_norm(Ar), inv_norm(Br)
        idx, val = run(ext, Ar, None, Br, None, a_scale, b_scale, random_splits(m, rng))
        ck.check(f"ties#{case} m={m} n={n} d={d}", idx, val, Ar, Br, a_scale, b_scale)
        ck.cases += 1
        first = {}
        for j, u in enumerate(uid.tolist()):
            first.setdefault(u, j)
        for i in range(m):
            j = int(idx[i])
            if j != first[int(uid[j])]:
                ck.fail(f"ties#{case}: row {i} picked {j}, an earlier duplicate is {first[int(uid[j])]}")
                break
        # Identical A rows must give bitwise-identical answers.
        for i in range(m):
            for i2 in range(i):
                if torch.equal(Ar[i], Ar[i2]) and a_scale[i] == a_scale[i2]:
                    if idx[i] != idx[i2] or val[i].view(torch.int32) != val[i2].view(torch.int32):
                        ck.fail(f"ties#{case}: identical rows {i2}, {i} differ")
                    break


def check_specials(ext, ck, gen):
    d, m, n = 37, 20, 53
    A, B = rand_bf16(m, d, gen=gen), rand_bf16(n, d, gen=gen)
    A[3] = 0  # all values 0 (NaN in column 2) -> index 0, value +0
    A[5, 7] = float("nan")  # all NaN -> index 0, -inf
    B[2, 4] = float("nan")  # column 2 never wins
    B[4] = 0
    a_scale, b_scale = inv_norm(A), inv_norm(B)
    b_scale[9] = float("nan")  # column 9 never wins
    a_scale[11] = float("nan")  # row 11: nothing wins
    idx, val = run(ext, A, None, B, None, a_scale, b_scale, [0, 7, 8, 20])
    ck.check("specials", idx, val, A, B, a_scale, b_scale)
    ck.cases += 1
    if not (idx[3] == 0 and val[3] == 0 and not math.copysign(1.0, float(val[3])) < 0):
        ck.fail(f"zero row: got ({int(idx[3])}, {float(val[3])})")
    for i in (5, 11):
        if not (idx[i] == 0 and val[i] == NEG_INF):
            ck.fail(f"NaN row {i}: got ({int(idx[i])}, {float(val[i])})")
    if (idx == 2).any() or (idx == 9).any():
        ck.fail("a NaN column won")
    # All-zero B: every value 0 (or NaN for the NaN row) -> index 0.
    Bz = torch.zeros(n, d, dtype=torch.bfloat16)
    idx, val = run(ext, A, None, Bz, None, a_scale, inv_norm(Bz))
    ck.check("zero B", idx, val, A, Bz, a_scale, inv_norm(Bz))


def check_determinism(ext, ck, rng, gen):
    """Same bits whatever the task split, thread count or panel buffer alignment."""
    m, n, d = 203, 161, 515
    A, B = rand_bf16(m, d, gen=gen), rand_bf16(n, d, gen=gen)
    a_scale, b_scale = inv_norm(A), inv_norm(B)
    base = None
    threads = torch.get_num_threads()
    for nt in (1, 2):
        torch.set_num_threads(nt)
        for splits in ([0, m], [0, 101, m], [0, 1, 2, 9, 100, m], random_splits(m, rng)):
            for offset in (0, 1, 3):
                out = run(ext, A, None, B, None, a_scale, b_scale, splits, offset)
                cur = (out[0], out[1].view(torch.int32))
                ck.cases += 1
                if base is None:
                    base = cur
                    ck.check("determinism", out[0], out[1], A, B, a_scale, b_scale)
                elif not (torch.equal(base[0], cur[0]) and torch.equal(base[1], cur[1])):
                    ck.fail(f"determinism: threads={nt} splits={splits} offset={offset} differ")
    torch.set_num_threads(threads)


def timed(fn, reps):
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def bench(ext, ck, reps):
    m = n = 2450
    d = 3584
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(m, d, generator=gen).to(torch.bfloat16)
    B = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    a_scale, b_scale = inv_norm(A), inv_norm(B)
    Af, Bf = A.float(), B.float()
    gflop = 2.0 * m * n * d / 1e9
    print(f"\nbench m={m} n={n} d={d} ({gflop:.1f} GFLOP), median (min) of {reps} runs, seconds")
    threads = torch.get_num_threads()
    results = {}
    for nt in (1, 2):
        torch.set_num_threads(nt)
        splits = [0, m] if nt == 1 else [0, m // 2, m]
        packed = ext.pack(B, None, n, d, 0)
        t_pack = timed(lambda: ext.pack_into(B, None, n, d, packed), reps)  # noqa: B023 (timed now)
        t_rows = timed(lambda: ext.rows(A, None, m, packed, n, d, a_scale, b_scale, splits), reps)  # noqa: B023
        t_bf16 = timed(lambda: torch.mm(A, B.t()), reps)
        t_fp32 = timed(lambda: torch.mm(Af, Bf.t()), reps)
        results[nt] = ext.rows(A, None, m, packed, n, d, a_scale, b_scale, splits)
        print(
            f"threads={nt}: dot_argmax rows {t_rows[0]:.4f} ({t_rows[1]:.4f}) = {gflop / t_rows[0]:.0f} GFLOP/s"
            f" + pack (serial) {t_pack[0]:.4f} | torch.mm bf16 {t_bf16[0]:.4f} ({t_bf16[1]:.4f})"
            f" | torch.mm fp32 {t_fp32[0]:.4f} ({t_fp32[1]:.4f})"
        )
    torch.set_num_threads(threads)
    ck.cases += 1
    if not (torch.equal(results[1][0], results[2][0]) and torch.equal(results[1][1].view(torch.int32), results[2][1].view(torch.int32))):
        ck.fail("bench: 1-thread and 2-thread results differ")
    ck.check("bench shape", *results[2], A, B, a_scale, b_scale)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ext = build()
    if not ext.supported():
        print("AVX512-BF16 not supported on this CPU/build: nothing to check")
        return 0
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ck = Checker()
    check_random_shapes(ext, ck, rng, gen)
    check_ties(ext, ck, rng, gen)
    check_specials(ext, ck, gen)
    check_determinism(ext, ck, rng, gen)
    print(f"correctness: {ck.cases} cases, {ck.failures} failures")
    if not args.no_bench:
        bench(ext, ck, args.reps)
        print(f"after bench: {ck.cases} cases, {ck.failures} failures")
    return 1 if ck.failures else 0


if __name__ == "__main__":
    sys.exit(main())
