"""`deltatune tasks`: the built-in tasks, or one task's dataset card."""
from __future__ import annotations

import json

from .common import check_task, print_table

NAME, HELP = "tasks", "list the tasks, or `tasks show NAME` for one dataset card"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    sub = p.add_subparsers(dest="tasks_command", metavar="show")
    show = sub.add_parser("show", help="print the dataset card of a task")
    show.add_argument("name", help="task name (see `deltatune tasks`)")


def run(args) -> int:
    from deltatune.tasks import TASKS

    if args.tasks_command == "show":
        from deltatune.tasks import load_task

        check_task(args.name)
        print(load_task(args.name).card())
        return 0
    if args.json:
        print(json.dumps([{"name": name, "description": text} for name, text in TASKS.items()]))
        return 0
    print_table(["task", "description"], [[name, text] for name, text in TASKS.items()])
    return 0
