"""Links torch (and the distributions it requires) from this interpreter's environment into
a folder that another venv puts on its path with a .pth line:

    .venv/bin/python tools/link_torch.py TARGET                   # torch and all it requires
    .venv/bin/python tools/link_torch.py TARGET --only torch triton 'nvidia-*' 'cuda-*'

A second copy of the CUDA build of torch is about 5 GB of disk and minutes of unpacking;
tools/wheel_check.sh (its fresh venv) and tools/vllm_env.sh (.venv-vllm, when it asks for
the torch the project venv holds) link it instead. --only keeps the distributions whose
normalised names match one of the patterns (fnmatch): the pinned heavy ones, so that pip in
the other venv still installs the small ones it wants at versions of its own choosing.
Symlinks point into the source venv: pip in the other venv sees them as installed and never
uninstalls them (they lie outside its environment).
"""

import argparse
import fnmatch
import importlib.metadata as md
import os
import shutil
import sys

from packaging.requirements import Requirement


def normalised(name: str) -> str:
    return name.lower().replace("_", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="distribution names to link (fnmatch)")
    parser.add_argument("--label", default="link_torch", help="the prefix of the line it prints")
    args = parser.parse_args()
    shutil.rmtree(args.target, ignore_errors=True)
    os.makedirs(args.target)
    todo, seen, linked = [Requirement("torch")], set(), set()
    while todo:
        req = todo.pop()
        dist = md.distribution(req.name)
        name = normalised(dist.metadata["Name"])
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for sub in map(Requirement, dist.requires or []):
            # a requirement counts when its marker holds with no extra or with one of the extras asked for
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in [""] + sorted(req.extras)):
                todo.append(sub)
        if args.only and not any(fnmatch.fnmatch(name, p) for p in args.only):
            continue
        linked.add(name)
        base = str(dist.locate_file(""))
        for top in {str(f).split("/", 1)[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if top.endswith(".pth") or top in ("__pycache__", "bin"):
                continue
            src, dst = os.path.join(base, top), os.path.join(args.target, top)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
    source = os.path.basename(sys.prefix)
    print(f"{args.label}: torch and {len(linked) - 1} distributions it requires, linked from {source}")


if __name__ == "__main__":
    main()
