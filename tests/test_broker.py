"""The embedded filesystem broker on a full disk: no message is left cut short in the queue, and
a worker that meets one (left by kombu's own transport) passes over it and goes on. On its own
folders, whichever broker the suite runs on."""

import errno
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from kombu import Connection
from kombu.exceptions import ChannelError

from diagnosis import services
from diagnosis.models import Analysis
from malaria_site import broker
from tests.conftest import ROOT, WorkerProcess, wait_for
from tests.factories import upload

TRANSPORT = "malaria_site.broker:Transport"  # as the settings name it for a filesystem:// broker


def connection_to(folder: Path) -> Connection:
    """The transport, on a queue folder of its own (its exchanges kept apart)."""
    (folder / "control").mkdir(parents=True, exist_ok=True)
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(folder / "control")}
    return Connection("filesystem://", transport=TRANSPORT, transport_options=options)


def test_the_settings_use_it_for_the_embedded_broker():
    probe = "import malaria_site.settings as s; print(s.CELERY_BROKER_TRANSPORT)"
    env = {**os.environ, "CELERY_BROKER_URL": "filesystem://"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == TRANSPORT, result.stderr[-2000:]


class _DiskFull:
    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        self.handle.write(data[:3])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_message_the_disk_has_no_room_for_leaves_nothing_in_the_queue(tmp_path, monkeypatch):
    def full_disk(path, mode):
        return _DiskFull(open(path, mode))  # noqa: SIM115 - closed by _DiskFull

    with connection_to(tmp_path) as connection:
        queue = connection.SimpleQueue(f"q{uuid.uuid4().hex}")  # kombu keeps what it declared, per process
        monkeypatch.setattr(broker, "open", full_disk, raising=False)
        with pytest.raises(ChannelError, match="No space left on device"):
            queue.put({"analysis_ids": [1]})
        assert [path.name for path in tmp_path.iterdir()] == ["control"], "a message cut short left in the queue"
        monkeypatch.undo()  # room again
        queue.put({"analysis_ids": [2]})
        assert queue.get(timeout=1).payload == {"analysis_ids": [2]}


def test_a_message_cut_short_is_passed_over_for_the_next(tmp_path):
    with connection_to(tmp_path) as connection:
        name = f"q{uuid.uuid4().hex}"  # kombu keeps what it declared, per process
        queue = connection.SimpleQueue(name)
        (tmp_path / f"0_{uuid.uuid4()}.{name}.msg").write_bytes(b"")  # what kombu's own _put leaves on ENOSPC
        queue.put({"analysis_ids": [3]})
        assert queue.get(timeout=1).payload == {"analysis_ids": [3]}


@pytest.mark.worker
@pytest.mark.slow
def test_a_worker_meeting_a_message_cut_short_goes_on_with_the_next(
    without_session_worker, user, media_root, tmp_path, monkeypatch
):
    from diagnosis.tasks import analyse_images

    monkeypatch.setattr(services, "enqueue_analyses", lambda **kwargs: None)  # sent below, to this broker
    folder = tmp_path / "broker"  # a filesystem broker of the worker's own (tests.settings reads TEST_BROKER_DIR)
    (folder / "control").mkdir(parents=True)
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    (folder / f"0_{uuid.uuid4()}.{queue}.msg").write_bytes(b"")
    broker_env = {"CELERY_BROKER_URL": "filesystem://", "TEST_BROKER_DIR": str(folder)}
    worker = WorkerProcess(media_root, tmp_path / "worker.log", broker_env).start()
    try:
        analysis = services.create_analysis(owner=user, upload=upload("after.png"))
        with connection_to(folder) as connection:
            analyse_images.apply_async(args=[[analysis.pk]], connection=connection, queue=queue)
        wait_for(lambda: Analysis.objects.get(pk=analysis.pk).status == "done", timeout=120)
        assert worker.process.poll() is None, "the worker stopped"
        assert "event=broker_message_unreadable" in (tmp_path / "worker.log").read_text(errors="replace")
    finally:
        worker.stop()
