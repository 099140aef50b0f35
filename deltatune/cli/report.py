"""`deltatune report DIR`: rebuild a bench's results.md, plots and report.html from DIR/results.csv, or a sweep's
results.md, results.csv and sweep.png from its records."""
from __future__ import annotations

NAME, HELP = "report", "rebuild a bench's or a sweep's table and plots from the files in DIR"


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="a bench folder (its --out) or a sweep folder (recognised by its "
                   "sweep.json); in a folder deltatune did not write, the report files are only added, never "
                   "replacing one")


def run(args) -> int:
    from deltatune import report

    text, paths = report.report_dir(args.dir)
    print(text)
    print(f"report: {paths['main']}")
    return 0
