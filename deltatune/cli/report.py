"""`deltatune report DIR`: rebuild results.md, the plots and report.html from DIR/results.csv."""
from __future__ import annotations

from pathlib import Path

NAME, HELP = "report", "rebuild results.md, the plots and report.html from DIR/results.csv"


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR")


def run(args) -> int:
    from deltatune import report

    rows = report.read_csv(Path(args.dir) / "results.csv")
    meta = report.read_meta(args.dir)
    paths = report.write_report(rows, args.dir, meta)
    print(report.markdown(rows, meta))
    print(f"report: {paths['html']}")
    return 0
