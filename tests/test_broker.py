"""The embedded filesystem broker on a full disk: no message is left cut short in the queue, and
a worker that meets one (left by kombu's own transport) passes over it and goes on."""

import errno
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from kombu import Connection
from kombu.exceptions import ChannelError

from diagnosis import services
from diagnosis.models import Analysis
from malaria_site import broker
from tests.conftest import WorkerProcess, wait_for
from tests.factories import upload

pytestmark = pytest.mark.skipif(
    not settings.CELERY_BROKER_URL.startswith("filesystem://"), reason="the embedded filesystem broker"
)


def connection_to(folder: Path) -> Connection:
    """The transport as the settings give it, on a queue folder of its own (exchanges kept apart)."""
    (folder / "control").mkdir(exist_ok=True)
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(folder / "control")}
    return Connection("filesystem://", transport=settings.CELERY_BROKER_TRANSPORT, transport_options=options)


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
def test_a_worker_meeting_a_message_cut_short_goes_on_with_the_next(without_session_worker, user, media_root, tmp_path):
    from malaria_site.celery import app

    app.control.purge()
    folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])
    (folder / f"0_{uuid.uuid4()}.{settings.CELERY_TASK_DEFAULT_QUEUE}.msg").write_bytes(b"")
    worker = WorkerProcess(media_root, tmp_path / "worker.log").start()
    try:
        analysis = services.create_analysis(owner=user, upload=upload("after.png"))
        wait_for(lambda: Analysis.objects.get(pk=analysis.pk).status == "done", timeout=120)
        assert worker.process.poll() is None, "the worker stopped"
        assert "event=broker_message_unreadable" in (tmp_path / "worker.log").read_text(errors="replace")
    finally:
        worker.stop()
