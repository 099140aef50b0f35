"""`deltatune methods`: the registered methods, as a table or JSON."""
from __future__ import annotations

import json

import deltatune as dt
from .common import jsonable, print_table

NAME, HELP = "methods", "list the registered methods"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def run(args) -> int:
    infos = [dt.method_info(name) for name in dt.methods()]
    if args.json:
        print(json.dumps(infos, default=jsonable))
        return 0
    rows = []
    for info in infos:
        # `sites`, plus any other *sites option, e.g. (IA)^3's input_sites.
        sites = "; ".join(",".join(value) + ("" if key == "sites" else f" ({key})")
                          for key, value in info["options"].items() if key.endswith("sites") and value)
        rows.append([info["name"], info["paper"], sites or "-", "yes" if info["mergeable"] else "no",
                     f"{info['lr']:g}"])
    print_table(["method", "paper", "default sites", "mergeable", "default lr"], rows)
    return 0
