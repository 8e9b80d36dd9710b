#!/usr/bin/env python3
"""Per-kernel register / shared memory / spill table of the CUDA kernels, from a build log.

    python tools/ptxas_report.py build/pip-build.log --out build/ptxas_report.md
    python tools/ptxas_report.py build.log --so g2tr_kernels/_C.*.so   # also check the binary
    python tools/ptxas_report.py --triton --out build/triton_ptxas_report.md  # the Triton kernels

The log is the output of a build whose nvcc runs with -Xptxas=-v,-warn-spills (setup.py
passes it; ninja prints each command's output, `pip install -v` keeps it). For every
kernel entry and every arch it reads registers, barriers, static shared memory, stack
frame and spill stores/loads, and prints one markdown table (a kernel per row, the archs
side by side). With --so it also reads the machine code embedded in the library
(cuobjdump --list-elf / --dump-resource-usage) and checks that every kernel of the log has
SASS for every arch, with no local memory.

With --triton it compiles the Triton kernels instead, offline (no GPU) for sm_80 and sm_90,
as their launchers launch them at D = 3584 and 3583 in bf16 and fp32
(tools/triton_offline.py), runs Triton's ptxas -v on each one's PTX and applies the same
rule: every kernel and specialisation, zero spills.

Exit status: 0 when clean; 1 on any spill (ptxas table or warning, or LOCAL > 0 in the
binary), a kernel missing SASS for an arch, or an arch missing for a kernel; 2 when the
log holds no ptxas output at all (a no-op rebuild: clear the build directory first, or
pass --allow-empty to accept that).
Dynamic shared memory is chosen at launch and is not in ptxas' numbers: the merge's
tensor-core kernel adds 61440 bytes (3 pipeline stages) to its static amount.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")
SMEM = re.compile(r"(\d+) bytes smem")
BARRIERS = re.compile(r"used (\d+) barriers")
SPILL_WARNING = re.compile(
    r"ptxas warning\s*: Registers are spilled to local memory in function '([^']+)', "
    r"(\d+) bytes spill stores, (\d+) bytes spill loads"
)


@dataclass
class Usage:
    registers: int = 0
    barriers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


@dataclass
class Report:
    # (mangled kernel, arch) -> usage; several TUs may compile the same entry: keep the worst
    entries: Dict[Tuple[str, str], Usage] = field(default_factory=dict)
    # spills of non-entry functions and ptxas spill warnings: (function, arch or "?", stores, loads)
    other_spills: List[Tuple[str, str, int, int]] = field(default_factory=list)


def parse_log(text: str) -> Report:
    report = Report()
    entry: Optional[Tuple[str, str]] = None
    arch = "?"
    properties_of: Optional[str] = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            entry = (m.group(1), m.group(2))
            arch = m.group(2)
            report.entries.setdefault(entry, Usage())
            properties_of = None
            continue
        m = PROPERTIES.search(line)
        if m:
            properties_of = m.group(1)
            continue
        m = FRAME.search(line)
        if m and properties_of is not None:
            stack, stores, loads = (int(g) for g in m.groups())
            if entry is not None and properties_of == entry[0]:
                u = report.entries[entry]
                u.stack = max(u.stack, stack)
                u.spill_stores = max(u.spill_stores, stores)
                u.spill_loads = max(u.spill_loads, loads)
            elif stores or loads:
                report.other_spills.append((properties_of, arch, stores, loads))
            properties_of = None
            continue
        m = USED.search(line)
        if m and entry is not None:
            u = report.entries[entry]
            rest = m.group(2)
            u.registers = max(u.registers, int(m.group(1)))
            b = BARRIERS.search(rest)
            s = SMEM.search(rest)
            u.barriers = max(u.barriers, int(b.group(1)) if b else 0)
            u.smem = max(u.smem, int(s.group(1)) if s else 0)
            continue
        m = SPILL_WARNING.search(line)
        if m:
            # ptxas may print an arch's warnings before its info lines: the arch is unknown here.
            report.other_spills.append((m.group(1), "?", int(m.group(2)), int(m.group(3))))
    return report


def demangle(names: List[str]) -> Dict[str, str]:
    """Readable kernel names: c++filt when present, namespace and parameter list dropped."""
    out = {n: n for n in names}
    tool = shutil.which("c++filt")
    if tool and names:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
        lines = res.stdout.splitlines()
        if res.returncode == 0 and len(lines) == len(names):
            out = {n: short_name(d) for n, d in zip(names, lines)}
    return out


def short_name(demangled: str) -> str:
    """'void g2tr::cuda::k<float, true>(float const*, ...)' -> 'k<float, true>'."""
    depth = 0
    end = len(demangled)
    for i, ch in enumerate(demangled):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    name = demangled[:end]
    if name.startswith("void "):
        name = name[len("void "):]
    return name.replace("g2tr::cuda::", "").replace("(anonymous namespace)::", "")


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, the toolkit (CUDA_HOME) or the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    try:
        import triton  # noqa: F401  (only for the path of its bundled CUDA tools)

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


RES_ARCH = re.compile(r"^arch = (sm_\w+)")
RES_FUNCTION = re.compile(r"^\s*Function ([^:\s]+):")
RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def binary_usage(cuobjdump: str, library: str) -> Tuple[List[str], Dict[Tuple[str, str], Tuple[int, int, int, int]]]:
    """ELF images and, per (kernel, arch), (REG, STACK, SHARED, LOCAL) of the SASS in the library."""
    elves = subprocess.run([cuobjdump, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True, check=True)
    usage: Dict[Tuple[str, str], Tuple[int, int, int, int]] = {}
    arch, function = "?", None
    for line in res.stdout.splitlines():
        m = RES_ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = RES_FUNCTION.search(line)
        if m:
            function = m.group(1)
            continue
        m = RES_USAGE.search(line)
        if m and function is not None:
            usage[(function, arch)] = tuple(int(g) for g in m.groups())  # type: ignore[assignment]
            function = None
    return [ln.strip() for ln in elves.splitlines() if ln.strip()], usage


def pair(values: List[str]) -> str:
    return " / ".join(values)


def markdown(report: Report, names: Dict[str, str], archs: List[str], triton: bool = False) -> str:
    kernels = sorted({k for k, _ in report.entries}, key=lambda k: names[k])
    head = "| kernel | registers | static smem (B) | barriers | stack (B) | spill stores (B) | spill loads (B) |"
    if triton:
        intro = [
            "# ptxas resource usage of the Triton kernels",
            "",
            "Written by `tools/ptxas_report.py --triton`: each kernel compiled offline as its launcher",
            "launches it (tools/triton_offline.py), labelled with the first case that compiled that",
            "specialisation, ptxas -v on its PTX. Per arch, in the order " + pair(archs) + ". An odd D",
            "(3583) runs the binaries of the rounded-up D (its rows are padded to 3584: the same",
            "specialisation), so it has no rows of its own. Triton's shared memory is dynamic and",
            "not in these numbers.",
        ]
    else:
        intro = [
            "# ptxas resource usage of the CUDA kernels",
            "",
            "Written by `tools/ptxas_report.py` from the `-Xptxas=-v` output of the build (see its",
            "docstring). Per arch, in the order " + pair(archs) + "; '-' where a kernel has no code for",
            "an arch. Static shared memory only: `assign_mma_kernel` also takes 61440 B of dynamic",
            "shared memory (its 3-stage pipeline) at launch.",
        ]
    lines = intro + ["", head, "|" + "---|" * 7]
    for k in kernels:
        cols: List[List[str]] = [[] for _ in range(6)]
        for a in archs:
            u = report.entries.get((k, a))
            vals = ["-"] * 6 if u is None else [
                str(u.registers), str(u.smem), str(u.barriers), str(u.stack), str(u.spill_stores), str(u.spill_loads)
            ]
            for c, v in zip(cols, vals):
                c.append(v)
        lines.append(f"| `{names[k]}` | " + " | ".join(pair(c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def triton_report(archs: Tuple[int, ...] = (80, 90)) -> Report:
    """The Triton kernels' ptxas usage, one entry per (kernel specialisation, sm_XX)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton_offline

    report = Report()
    for (label, arch), text in triton_offline.ptxas_logs(archs).items():
        one = parse_log(text)
        for (_, _), usage in one.entries.items():
            report.entries[(label, arch)] = usage
        report.other_spills += [(label, arch, stores, loads) for _, _, stores, loads in one.other_spills]
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", help="build log with the -Xptxas=-v output")
    parser.add_argument("--triton", action="store_true",
                        help="compile the Triton kernels offline for sm_80 and sm_90 and report those instead")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--so", help="built library (glob allowed) whose SASS to check with cuobjdump")
    parser.add_argument("--archs",
                        help="archs every kernel must have, e.g. sm_80,sm_90 (default: all archs in the log)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="exit 0 when the log has no ptxas output (an incremental rebuild compiled nothing)")
    args = parser.parse_args(argv)

    if args.triton:
        report = triton_report()
        args.log = "the offline Triton compile"
    elif args.log is None:
        parser.error("give a build log, or --triton")
    else:
        with open(args.log, errors="replace") as f:
            report = parse_log(f.read())
    if not report.entries:
        print(f"ptxas_report: no ptxas -v output in {args.log}: was the build a no-op? "
              "Remove the build directory and rebuild with -Xptxas=-v.", file=sys.stderr)
        return 0 if args.allow_empty else 2
    archs = args.archs.split(",") if args.archs else sorted({a for _, a in report.entries})
    all_names = sorted({k for k, _ in report.entries} | {f for f, *_ in report.other_spills})
    names = {n: n for n in all_names} if args.triton else demangle(all_names)
    table = markdown(report, names, archs, triton=args.triton)
    print(table, end="")
    problems: List[str] = []
    for (k, a), u in sorted(report.entries.items()):
        if u.spill_stores or u.spill_loads:
            problems.append(f"{names[k]} on {a}: {u.spill_stores} B spill stores, {u.spill_loads} B spill loads")
    spilled = {k for (k, _), u in report.entries.items() if u.spill_stores or u.spill_loads}
    for f_name, a, stores, loads in report.other_spills:
        if f_name in spilled:
            continue  # already reported from its entry's table row
        problems.append(f"{names.get(f_name, f_name)} on {a}: {stores} B spill stores, {loads} B spill loads (ptxas)")
    kernels = sorted({k for k, _ in report.entries})
    for k in kernels:
        for a in archs:
            if (k, a) not in report.entries:
                problems.append(f"{names[k]}: not compiled for {a}")

    if args.so:
        matches = sorted(glob.glob(args.so))
        if len(matches) != 1:
            problems.append(f"--so {args.so}: expected one library, found {matches}")
        else:
            tool = find_cuobjdump()
            if tool is None:
                problems.append("cuobjdump not found (PATH, CUDA_HOME/bin, or Triton's bundled copy)")
            else:
                elves, usage = binary_usage(tool, matches[0])
                print(f"\n{os.path.basename(matches[0])}: {len(elves)} ELF images "
                      f"({', '.join(e.split(':')[-1].strip() for e in elves)})")
                for k in kernels:
                    for a in archs:
                        got = usage.get((k, a))
                        if got is None:
                            problems.append(f"{names[k]}: no {a} SASS in {os.path.basename(matches[0])}")
                        elif got[3] != 0:
                            problems.append(f"{names[k]} on {a}: {got[3]} B local memory in the SASS")
                present = sum(1 for k in kernels for a in archs if (k, a) in usage)
                print(f"SASS present for {present} of {len(kernels) * len(archs)} (kernel, arch) pairs "
                      f"({len(kernels)} kernels x {', '.join(archs)})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    if problems:
        print("\nptxas_report: FAILED", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"\nptxas_report: {len(kernels)} kernels x {len(archs)} archs, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
