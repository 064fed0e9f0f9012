"""The suite's own machinery (tests/conftest.py): what one test starts does not decide another's outcome."""

import ast

import pytest

from diagnosis import services
from diagnosis.models import Analysis
from tests.conftest import ROOT, default_queues, purge_queues, queued_messages, wait_for
from tests.factories import upload

pytest_plugins = ["pytester"]


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_the_session_worker_takes_no_task_of_a_test_that_did_not_ask_for_it(_session_worker, user, request):
    """Once the first worker test had started it, the session worker took the tasks of every later
    transactional or live-server test that committed an upload, and analysed those cells mid-test:
    outcomes hung on the order tests ran in and on -m."""
    if _session_worker.process.poll() is not None:
        _session_worker.start()
    analyses_queue = default_queues()[0]
    purge_queues(default_queues())
    unasked = services.create_analysis(owner=user, upload=upload("not-for-the-worker.png"))
    assert queued_messages(analyses_queue) == 1

    request.getfixturevalue("tasks_to_the_session_worker")  # from here on, as a test that asked for it
    asked = services.create_analysis(owner=user, upload=upload("for-the-worker.png"))
    wait_for(lambda: Analysis.objects.get(pk=asked.pk).status == "done", timeout=180)
    assert Analysis.objects.get(pk=unasked.pk).status == "queued"
    assert queued_messages(analyses_queue) == 1, "the session worker took the task of a test that did not ask for it"
    assert f"analysis_id={unasked.pk} " not in _session_worker.log_path.read_text(errors="replace")
    purge_queues(default_queues())


def test_a_module_skipped_whole_fails_the_run_under_ci_and_the_rest_still_runs(pytester, monkeypatch):
    """The skip-to-failure hook saw the tests' reports only: a module skipped as it is collected
    (pytest.importorskip of a missing package, say) is a collection report, and .ci/run stayed green."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(
        test_probe='import pytest\npytest.importorskip("no_such_module_anywhere")\n\ndef test_x():\n    pass\n',
        test_kept="def test_y():\n    assert 1 + 1 == 2\n",
    )
    plugin = ["-p", "tests.every_test_runs", "-p", "no:django", "-p", "no:cacheprovider"]

    monkeypatch.delenv("REQUIRE_REAL_SERVICES", raising=False)
    anywhere = pytester.runpytest_subprocess(*plugin)
    anywhere.assert_outcomes(passed=1, skipped=1)
    assert anywhere.ret == pytest.ExitCode.OK

    monkeypatch.setenv("REQUIRE_REAL_SERVICES", "1")
    under_ci = pytester.runpytest_subprocess(*plugin)
    under_ci.assert_outcomes(passed=1, skipped=1)
    assert under_ci.ret == pytest.ExitCode.TESTS_FAILED
    under_ci.stdout.fnmatch_lines(["FAILED test_probe.py - skipped whole under .ci/run*no_such_module_anywhere*"])


def test_no_test_asserts_on_how_long_something_took():
    """A duration measured by the test is printed, not asserted: on a loaded two-core runner
    ``waited < 60`` can fail a working product. A test checks an outcome it can observe instead
    (an answer within the client's timeout, a line in a log)."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        measured = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and "time.monotonic() - " in ast.unparse(node.value)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)):
                continue
            if {name.id for name in ast.walk(node.test) if isinstance(name, ast.Name)} & measured:
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node.test)}")
    assert not offenders, offenders


@pytest.mark.worker
def test_a_test_worker_keeps_its_model_marker_out_of_the_checkout(celery_worker_process):
    """WorkerProcess passed no VAR_DIR: each test worker deleted, then wrote, var/worker-model-ready
    in the checkout, the marker by which a platform running from it has its worker's health checked."""
    worker = celery_worker_process
    wait_for(lambda: b"event=model_warm" in worker.log_path.read_bytes(), timeout=120)
    assert (worker.var_dir / "worker-model-ready").is_file()
    in_the_checkout = ROOT / "var" / "worker-model-ready"
    assert not in_the_checkout.exists() or in_the_checkout.stat().st_mtime < worker.started_at


def test_a_test_in_pytests_own_process_writes_its_model_marker_out_of_the_checkout(settings):
    """A test that warmed the model up in this process (the thread setting's) deleted and rewrote
    var/worker-model-ready in the checkout: only the tests about the marker gave VAR_DIR a folder."""
    from diagnosis import inference

    assert ROOT / "var" not in inference.model_ready_file().parents
