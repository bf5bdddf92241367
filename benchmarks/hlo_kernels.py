"""Kernels an XLA-compiled step launches, counted from its optimized HLO.

Where does a constraint's time go on a GPU, when its memory traffic is a
fraction of a millisecond? Each separately launched kernel costs a few
microseconds whatever it moves, so a step's kernel count is the first thing to
compare between plain fine-tuning and a constrained step. This reads the text
dumps XLA writes with `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`
(`benchmarks/overhead.py --count-kernels` sets that up and counts each method's
step) and counts, in the entry computation and the loops and calls it runs
(not inside fusions, which are one kernel each), every instruction that is
work: fusions, custom calls (cuDNN convolutions, cuBLAS GEMMs), copies and
unfused operations.

    python -m benchmarks.hlo_kernels DIR
"""

import argparse
import collections
import glob
import os
import re

#: Instructions that launch no kernel of their own.
NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
               "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
               "get-dimension-size", "domain"}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][\w\-]*)\(")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w\-]+?)(?:[.\d]*)\s*=")
_CALLED = re.compile(r"\b(?:body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|branch_computations=\{([^}]*)\}")


def _computations(text):
    """`{name: [instruction lines]}` and the entry computation's name."""
    comps, entry, name = {}, None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            name = m.group(2)
            comps[name] = []
            if m.group(1):
                entry = name
        elif line.strip() == "}":
            name = None
        elif name is not None and line.strip():
            comps[name].append(line)
    return comps, entry


def _kernel_lines(text):
    """`(opcode, instruction line)` of every instruction that launches work,
    over the entry computation and every computation it runs through `while`,
    `conditional` and `call` (a fusion is one, its body is not followed)."""
    comps, entry = _computations(text)
    if entry is None:
        raise ValueError("no ENTRY computation: not an HLO module text dump.")
    todo, seen = [entry], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(1)
            if op not in NOT_KERNELS:
                yield op, line
            if op in ("while", "conditional", "call"):
                for single, several in _CALLED.findall(line):
                    todo += [single] if single else [c.strip().lstrip("%") for c in several.split(",")]


def kernel_counts(text):
    """Kernels per opcode in one optimized HLO module (text).

    Args:
        text: the module, as XLA dumps it (`*after_optimizations.txt`), or
            as `jax.stages.Compiled.as_text()` gives it.

    Returns:
        A `collections.Counter` of opcode -> instructions that launch work,
        over the entry computation and every computation it runs through
        `while`, `conditional` and `call` (fusions count once, as `fusion`).
    """
    return collections.Counter(op for op, _ in _kernel_lines(text))


def kernel_names(text):
    """Kernels per name stem in one optimized HLO module (text): XLA names a
    fusion after what it does (`input_reduce_fusion.353`,
    `wrapped_transpose.4`, `loop_add_subtract_fusion`), so the stems say
    which kinds of kernel a change adds.

    Args:
        text: as for `kernel_counts`.

    Returns:
        A `collections.Counter` of name stem (numbering removed) -> kernels.
    """
    return collections.Counter(_NAME.match(line).group(1) for _, line in _kernel_lines(text))


def summary(counts):
    """`(total, fusions, custom calls, other)` of a `kernel_counts` result."""
    fusion, custom = counts.get("fusion", 0), counts.get("custom-call", 0)
    total = sum(counts.values())
    return total, fusion, custom, total - fusion - custom


def modules(folder, pattern="train"):
    """The optimized modules in an XLA dump folder whose name contains
    `pattern`, in compilation order: `[(file name, text)]`."""
    files = sorted(glob.glob(os.path.join(folder, "module_*after_optimizations.txt")))
    return [(os.path.basename(f), open(f).read()) for f in files
            if pattern in os.path.basename(f) and "buffer-assignment" not in f and "memory-usage" not in f]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="an XLA dump folder (--xla_dump_to)")
    p.add_argument("--pattern", default="train", help="module names to count (default: train)")
    a = p.parse_args()
    print("| module | kernels | fusions | custom calls | other |")
    print("|---|---|---|---|---|")
    for name, text in modules(a.folder, a.pattern):
        print("| {} | {} | {} | {} | {} |".format(name, *summary(kernel_counts(text))))


if __name__ == "__main__":
    main()
