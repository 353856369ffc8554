"""Compare the upstream suite's JUnit report(s) with tests/upstream/expected-failures.txt.

    python tests/upstream/compare.py EXPECTED FIRST.xml [RERUN.xml] [--unexpected-to FILE]

A test failing in FIRST but passing in RERUN (the unexpected failures run once more, alone)
counts as flaky, not failed.  Exit 1 if a test fails that is not expected, or if an expected
failure passed (remove it from the list: the list can only shrink).  ``--unexpected-to``
writes the unexpected failures' node ids, one a line (what the rerun runs).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET


def expected_failures(path: str) -> dict[str, str]:
    found = {}
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith("#"):
            test, _, reason = line.partition("  # ")
            found[test.strip()] = reason.strip()
    return found


def outcomes(report: str) -> tuple[set[str], set[str]]:
    """(passed, failed) node ids of a JUnit report (``tests/unit/test_x.py::test_y[p]``)."""
    passed, failed = set(), set()
    for case in ET.parse(report).iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.unit.test_run[.TestClass]
        cls = [parts.pop()] if parts and parts[-1][:1].isupper() else []
        test = "::".join(["/".join(parts) + ".py", *cls, case.get("name", "")])
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(test)
        elif case.find("skipped") is None:
            passed.add(test)
    return passed, failed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("expected")
    parser.add_argument("first")
    parser.add_argument("rerun", nargs="?")
    parser.add_argument("--unexpected-to")
    args = parser.parse_args()
    expected = expected_failures(args.expected)
    try:
        passed, failed = outcomes(args.first)
    except (OSError, ET.ParseError) as exc:
        print(f"the suite left no report: {exc}")
        return 1
    flaky: set[str] = set()
    if args.rerun:
        passed_again, _ = outcomes(args.rerun)
        flaky = (failed - expected.keys()) & passed_again
        failed -= flaky
    unexpected = sorted(failed - expected.keys())
    # a test listed as flaky may pass or fail; any other listed test that passes must go
    now_passing = sorted(test for test in passed & expected.keys() if not expected[test].startswith("flaky"))
    print(f"{len(passed)} passed, {len(failed)} failed ({len(failed & expected.keys())} expected)"
          + (f", {len(flaky)} failed once and passed when run again" if flaky else ""))
    for test in sorted(flaky):
        print(f"flaky: {test}")
    for test in unexpected:
        print(f"UNEXPECTED FAILURE: {test}")
    for test in now_passing:
        print(f"NOW PASSES (remove it from {args.expected}): {test}")
    if args.unexpected_to:
        with open(args.unexpected_to, "w", encoding="utf-8") as out:
            out.writelines(f"{test}\n" for test in unexpected)
    return 1 if unexpected or now_passing else 0


if __name__ == "__main__":
    sys.exit(main())
