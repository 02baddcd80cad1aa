"""The embedded queue's message files appear whole or not at all (worker.embedded_queue)."""

from __future__ import annotations

import queue
import threading

import pytest
from kombu import Connection

import worker.embedded_queue as embedded_queue


def _queue(folder):
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(folder)}
    return Connection(transport="worker.embedded_queue:Transport", transport_options=options).SimpleQueue("celery")


def test_a_message_being_written_is_not_consumed(tmp_path, monkeypatch):
    """kombu's own transport exposes the file from its open(): a consumer polling then read it half-written
    and the worker stopped (JSONDecodeError). Here it is invisible until renamed into place."""
    written, release = threading.Event(), threading.Event()
    real_fsync = embedded_queue.os.fsync

    def paused_fsync(fd):  # the message is written, not yet renamed: hold it there
        written.set()
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(embedded_queue.os, "fsync", paused_fsync)
    producer, consumer = _queue(tmp_path), _queue(tmp_path)
    putter = threading.Thread(target=producer.put, args=({"job": "x" * 100_000},))
    putter.start()
    assert written.wait(10)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".msg")] != []  # the partial file exists ...
    with pytest.raises(queue.Empty):
        consumer.get(timeout=0.3)  # ... and is not consumed
    release.set()
    putter.join(10)
    message = consumer.get(timeout=5)
    assert message.payload == {"job": "x" * 100_000}
    message.ack()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
