"""`deltatune report DIR`: rebuild results.md, the plots and report.html from DIR/results.csv."""
from __future__ import annotations

from pathlib import Path

NAME, HELP = "report", "rebuild results.md, the plots and report.html from DIR/results.csv"


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="a bench folder (its --out); in a folder `deltatune bench` did not write, "
                   "the report files are only added, never replacing one")


def run(args) -> int:
    from deltatune import report

    folder = report.report_folder(args.dir)
    folder.check()  # a folder the report may write (nothing through a link, nothing of the user's replaced)
    try:
        rows = report.read_csv(Path(folder.path) / report.RESULTS_FILE)
        meta = report.read_meta(folder.path)
        paths = report.write_report(rows, folder, meta)
    finally:
        folder.close()
    print(report.markdown(rows, meta))
    print(f"report: {paths['html']}")
    return 0
