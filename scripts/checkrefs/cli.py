"""The command line: read the inputs, scrape the broker binary, run the checks (or the
mutation self-test), print one line per failure; exit 0 passed, 1 failed, 2 bad usage."""

import argparse
import sys
from pathlib import Path

from . import __doc__ as DOC
from .checks import run_checks
from .exported import ExportError, Exported, scrape_binary
from .mutations import PROG, self_test
from .objects import load_docs

REPO = Path(__file__).resolve().parent.parent.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=DOC.split("\n\n")[0])
    parser.add_argument("renders", nargs="+", metavar="RENDER", help="rendered overlay (kubectl kustomize output)")
    parser.add_argument("--with", dest="standalone", action="append", default=[], metavar="FILE",
                        help="standalone input checked with every render (monitoring render, adapter "
                             "values, scrape config)")
    parser.add_argument("--broker", type=Path, default=REPO / "target/release/broker",
                        help="the broker binary whose /metrics is the truth (default: %(default)s)")
    parser.add_argument("--runbook", type=Path, default=REPO / "docs/runbook.md",
                        help="the runbook alerts' runbook_url sections must exist in (default: %(default)s)")
    parser.add_argument("--rule-tests", metavar="DIR", help="promtool test files: every alert must have some")
    parser.add_argument("--self-test", action="store_true", help="run the mutation test on the inputs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        exported = Exported(scrape_binary(args.broker))
    except ExportError as e:
        print(f"{PROG}: cannot read what the broker exports: {e}", file=sys.stderr)
        return 1
    renders = [(p, load_docs(p)) for p in args.renders]
    standalone = [(p, load_docs(p)) for p in args.standalone]
    if args.self_test:
        return self_test(renders, standalone, exported, args.rule_tests, args.runbook)
    checker = run_checks(renders, standalone, exported, args.rule_tests, args.runbook)
    for line in checker.errors:
        print(f"{PROG}: {line}")
    if checker.errors:
        print(f"{PROG}: {len(checker.errors)} broken references")
        return 1
    objects = sum(len(d) for _, d in renders + standalone)
    print(f"{PROG}: {len(renders)} renders + {len(standalone)} standalone files ({objects} objects), "
          f"{checker.checked} references checked against {len(exported.names)} exported series: passed")
    return 0
