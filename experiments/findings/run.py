"""Measure the seed papers' claims on our tasks and write docs/findings.md: a script of the repository,
not part of the installed package (it uses deltatune's public API and its own run files only).

    python experiments/findings/run.py --claims 4,5 --plan        # the runs, done and to do, and a time estimate
    python experiments/findings/run.py --claims 4,5               # run what is missing (resumable), then the page
    python experiments/findings/run.py --claims 4,5 --ray auto --work /shared/findings   # the same on a Ray cluster
    python experiments/findings/run.py --render-only              # the page from the run files alone
    python experiments/findings/run.py --claims 2 --rescore       # per-example test scores for runs that reproduce

Run from the repository root (the defaults --out docs/findings and --page docs/findings.md are relative
to it). See experiments/findings/suite.py for the claims and the protocol, page.py for the page.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the `findings` package

from deltatune import ConfigError, DeltatuneError  # noqa: E402

from findings.suite import CLAIMS, DEFAULT_OUT, ORDER, PAGE, rescore, run_suite  # noqa: E402


def _parse_part(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    i, sep, n = text.partition("/")
    try:
        part = (int(i), int(n))
    except ValueError:
        part = None
    if not sep or part is None or not 1 <= part[0] <= part[1]:
        raise ConfigError(f"--part {text!r}: expected I/N with 1 <= I <= N, e.g. --part 1/2")
    return part


def _parse_claims(text: str) -> list[str]:
    claims = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in claims if c not in CLAIMS]
    if not claims or unknown:
        raise ConfigError(f"--claims {text!r}: the claims are {','.join(sorted(CLAIMS))} (issues 12 and 13)")
    return claims


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python experiments/findings/run.py",
                                description="measure the seed papers' claims on our tasks and write docs/findings.md "
                                            "(resumable: finished runs are skipped)")
    p.add_argument("--claims", default=",".join(ORDER), help=f"comma list of claims (default all: {','.join(ORDER)})")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2); lr is tuned on seed 0")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"run files and plots (default {DEFAULT_OUT})")
    p.add_argument("--page", default=PAGE, metavar="FILE", help=f"the page written (default {PAGE})")
    p.add_argument("--ray", metavar="auto|ADDRESS",
                   help="train the runs on a Ray cluster (through deltatune sweep: a grid's lrs at once, one run per "
                        "worker); --work must then be a path every node sees. The run files and the page are "
                        "written here")
    p.add_argument("--part", metavar="I/N", help="run only part I of N (every N-th lr group), for machines that share "
                   "no Ray cluster; merge parts by copying their run files into one --out (with --ray, not needed)")
    p.add_argument("--plan", action="store_true", help="print the runs and an estimated time; run nothing")
    p.add_argument("--render-only", "--render", dest="render_only", action="store_true",
                   help="write the page from the run files; run nothing")
    p.add_argument("--rescore", action="store_true",
                   help="train finished runs without per-example test scores again and attach the scores where the "
                        "re-run reproduces the recorded test score exactly (a run file's numbers never change); then "
                        "the page. Private runs are skipped (their noise is fresh by design)")
    p.add_argument("--work", default="runs/findings", metavar="DIR",
                   help="scratch: the sweeps' folders and their run folders under sweeps/ (the adapters the analysis "
                        "compares are kept; default runs/findings)")
    return p


def run(args) -> int:
    claims = _parse_claims(args.claims)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"--seeds {args.seeds!r}: give a comma list of seeds, e.g. --seeds 0,1,2")
    part = _parse_part(args.part)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.plan:
        run_suite(claims, seeds, args.out, part, plan_only=True, log=lambda t: print(t, flush=True))
        return 0
    if args.rescore:
        done = rescore(claims, seeds, args.out, work_dir=args.work, log=log)
        log(f"rescore: {len(done['attached'])} reproduced (scores attached), {len(done['differed'])} did not "
            f"reproduce (files unchanged), {len(done['skipped'])} private runs skipped")
    elif not args.render_only:
        started = time.monotonic()
        result = run_suite(claims, seeds, args.out, part, work_dir=args.work, log=log, ray=args.ray)
        log(f"{len(result['ran'])} runs done, {len(result['skipped'])} already there, {len(result['failed'])} failed, "
            f"{len(result['waiting'])} waiting, in {(time.monotonic() - started) / 60:.1f} min")
    from findings.page import render

    path = render(claims=claims, seeds=seeds, out=args.out, page=args.page)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """The script's exit status: 0, or 2 with one line on stderr for bad flags or bad run files."""
    args = parser().parse_args(argv)
    try:
        return run(args)
    except DeltatuneError as err:  # a bad flag, a bad run file: one line naming it, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
