"""Under .ci/run (REQUIRE_REAL_SERVICES) every test must run: a skip there (a missing nginx,
redis-server or browser) would hide a test that never ran behind a green build. A test that skips
fails, saying why; a module skipped whole as it is collected (pytest.importorskip, or skip with
allow_module_level) fails the run, named in the summary, while the other modules' tests still run.
A pytest plugin of its own, so it can be tested on its own; tests/conftest.py loads it."""

import os

import pytest

_skipped_modules: list[pytest.CollectReport] = []


def _every_test_must_run() -> bool:
    return bool(os.environ.get("REQUIRE_REAL_SERVICES"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _every_test_must_run() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under .ci/run, where every test must run: {report.longrepr}"


def pytest_collectreport(report):
    if _every_test_must_run() and report.skipped:
        _skipped_modules.append(report)


def pytest_terminal_summary(terminalreporter):
    for report in _skipped_modules:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        terminalreporter.write_line(
            f"FAILED {report.nodeid} - skipped whole under .ci/run, where every test must run: {reason}", red=True
        )


def pytest_sessionfinish(session):
    if _skipped_modules and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
