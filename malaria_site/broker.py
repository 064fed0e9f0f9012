"""kombu's filesystem transport (the embedded default broker) made safe against a full disk.

kombu writes a message straight into the queue folder: when the disk fills between creating the
file and writing it, an empty message stays there, and the worker that reads it stops on the
JSON error ("Unrecoverable error"), which stops scripts/start's web server with it. Here a message
is written under a name no reader takes and renamed into the queue once whole; a message that is
not whole all the same (left by kombu's own transport) is logged and passed over.
"""

import contextlib
import logging
import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

logger = logging.getLogger("diagnosis.broker")


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # As kombu names it (its readers take "<queue>.msg" names, in the order of the time in front).
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".partial"
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add a message to {self.data_folder_out}: {error.strerror}") from error

    def _get(self, queue):
        while True:
            try:
                return super()._get(queue)  # takes the file out of the queue before it parses it
            except ValueError:
                logger.error("event=broker_message_unreadable queue=%s: passed over", queue)


class Transport(filesystem.Transport):
    Channel = Channel
