"""Language-identification ceilings of the 18 recorded languages: on continuation-sized pieces of real FLORES
devtest text (``lsn_exp.lid.pieces``), the share each identifier labels as the language, over every label it
knows (full) or the recorded ones (restricted), under the id/ms rule (``lid.counts_as``) and strictly; what the
misses are labelled; and how often the two identifiers agree.

    .venv/bin/python scripts/lid_table.py [--n 200] [--first 200] [--words 15]
"""

from __future__ import annotations

import argparse
from collections import Counter

from lsn_exp import data, lid


def shares(labels: list[str], target: str) -> tuple[float, float]:
    """(under the id/ms rule, strict)."""
    n = max(len(labels), 1)
    return sum(lid.counts_as(x, target) for x in labels) / n, sum(x == target for x in labels) / n


def misses(labels: list[str], target: str, top: int = 3) -> str:
    """The commonest wrong labels with their shares, e.g. ``ms .16, en .01``."""
    wrong = Counter(x for x in labels if x != target).most_common(top)
    return ", ".join(f"{x} {c / len(labels):.2f}" for x, c in wrong) or "-"


def row(root, code: str, cut_args: dict) -> list[str]:
    texts = lid.pieces(root, code, **cut_args)
    cells, restricted = [], {}
    for name in lid.IDENTIFIERS:
        full = lid.identify(texts, None, name)
        restricted[name] = lid.identify(texts, lid.RECORDED, name)
        if code not in lid.covered(name):
            cells += ["not covered"] * 3
            continue
        cells += [f"{shares(full, code)[0]:.2f}", "{:.2f} ({:.2f})".format(*shares(restricted[name], code)),
                  misses(full, code)]
    agree = sum(a == b for a, b in zip(*restricted.values())) / len(texts)
    return [code, str(len(texts)), *cells, f"{agree:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=lid.PIECE_N)
    parser.add_argument("--first", type=int, default=lid.PIECE_FIRST)
    parser.add_argument("--words", type=int, default=lid.PIECE_WORDS)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    root = data.resolve_root(args.data_root)
    cut_args = {"n": args.n, "first": args.first, "words": args.words}
    head = ["lang", "n"] + [f"{name} {col}" for name in lid.IDENTIFIERS
                            for col in ("full", "restricted (strict)", "full: misses")] + ["agreement"]
    print(f"pieces: {args.words} words after a {lid.PIECE_SKIP}-word opening (x3 characters for "
          f"{' '.join(data.NO_SPACE_LANGS)}), devtest openings {args.first}..{args.first + args.n - 1}; "
          f"shares count id and ms for each other, (strict) does not; agreement: same restricted label")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for code in data.LANG_ORDER:
        print("| " + " | ".join(row(root, code, cut_args)) + " |", flush=True)


if __name__ == "__main__":
    main()
