"""kombu's filesystem transport with atomic message files: the embedded queue of ``osteonode serve``.

kombu's filesystem transport (5.x) writes a message file in place while the
consumer, polling the same folder, moves and reads any file it finds without
the writer's lock: a message read half-written fails to decode, and the
worker stops with "Unrecoverable error: JSONDecodeError" (seen when a study
completed while the worker polled). Here a message is written under a
name the consumer ignores, fsynced, and renamed into place, so the consumer
sees a whole message or none. Everything else is kombu's.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """The filesystem channel, putting each message by write, fsync and rename."""

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"  # kombu's name: its order and queue
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".tmp-{name}")  # no '<queue>.msg' suffix: not consumed
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """The filesystem transport with :class:`Channel`."""

    Channel = Channel
