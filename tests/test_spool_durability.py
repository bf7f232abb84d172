"""SPEC 9 durability: write failures, the size limit, start-up clean-up,
kill -9 and graceful stop. Real files, real processes, real downstreams."""

import os
import shutil
import socket
import threading
from types import SimpleNamespace

import pytest

from conftest import wait_until
from relay_lib.spool import queue as spool
from spool_kit import (MESSAGE, files, kill_9, late_sink, queue_empty, send, spool_process,  # noqa: F401
                       spool_relay)
from test_spool import queued_id


def no_temporary_files(spool_dir):
    return [os.path.join(d, n) for d, _, names in os.walk(spool_dir) for n in names if n.startswith(".tmp-")]


def test_9_durability_unwritable_queue_gives_the_no_spool_451_and_leaves_nothing(
        spool_relay, late_sink, relay_log):
    relay = spool_relay(remotes=late_sink().url())
    # A file where the queue folder should be: no write can succeed, even as root.
    shutil.rmtree(os.path.join(relay.spool_dir, "queue"))
    open(os.path.join(relay.spool_dir, "queue"), "wb").close()
    code, text = send(relay, ["b@example.org"], MESSAGE)
    assert (code, text) == (451, b"4.4.1 Forwarding failed, try again later")
    assert os.path.getsize(os.path.join(relay.spool_dir, "queue")) == 0
    assert no_temporary_files(relay.spool_dir) == [] and relay.spool.queued == 0
    assert any(r.getMessage() == "cannot queue" for r in relay_log.records)


def test_9_durability_unwritable_queue_in_always_mode_is_452(spool_relay, sink):
    relay = spool_relay(remotes=sink.url(), spool_mode="always")
    shutil.rmtree(os.path.join(relay.spool_dir, "queue"))
    open(os.path.join(relay.spool_dir, "queue"), "wb").close()
    assert send(relay, ["b@example.org"], MESSAGE) == (452, b"4.3.1 Insufficient system storage, try again later")
    assert sink.box == [] and no_temporary_files(relay.spool_dir) == []


def test_9_durability_spool_dir_below_a_file_is_a_config_error(tmp_path):
    from relay_lib.config.settings import ConfigError, from_file
    from relay_lib.service import Service

    (tmp_path / "plain-file").write_bytes(b"")
    ini = tmp_path / "relay.ini"
    ini.write_text("listen = 127.0.0.1:0\nremotes = file:outbox\nspool_dir = plain-file/spool\n")
    relay = Service(from_file(str(ini)))
    with pytest.raises(ConfigError) as caught:
        relay.start()
    assert caught.value.option == "spool_dir" and "cannot create" in caught.value.reason
    relay.stop()


def test_9_spool_max_size_past_it_the_client_gets_451(spool_relay, late_sink, relay_log):
    big = MESSAGE + b"x" * 1500 + b"\r\n"
    relay = spool_relay(remotes=late_sink().url(), spool_max_size="3000", queue_retry_min="1h",
                        queue_retry_max="1h")
    queued_id(*send(relay, ["b@example.org"], big))
    assert send(relay, ["b@example.org"], big) == (451, b"4.4.1 Forwarding failed, try again later")
    assert len(files(relay.spool_dir)) == 2
    assert any(r.getMessage() == "queue full, not queued" for r in relay_log.records)


def test_9_restart_removes_temporary_and_orphan_files_and_sets_aside_corrupt_state(
        spool_relay, late_sink, relay_log):
    down = late_sink()
    first = spool_relay(remotes=down.url(), queue_retry_min="1h", queue_retry_max="1h")
    message_id = queued_id(*send(first, ["b@example.org"], MESSAGE))
    first.stop()
    queue = os.path.join(first.spool_dir, "queue")
    junk = {".tmp-half": b"half a mess", "orphan.eml": b"Subject: never got a 250\r\n\r\n",
            "bad.json": b"{not json", "bad.eml": b"Subject: bad\r\n\r\n", "lonely.json": b"{}"}
    for name, data in junk.items():
        with open(os.path.join(queue, name), "wb") as f:
            f.write(data)
    sink = down.up()
    second = spool_relay(remotes=down.url())
    assert second.spool.queued == 1
    assert wait_until(lambda: len(sink.box) == 1 and queue_empty(second))
    assert message_id.encode() in sink.box[0].content
    assert files(second.spool_dir, "corrupt") == ["bad.eml", "bad.json", "lonely.json"]
    errors = [r.fields["id"] for r in relay_log.records if r.getMessage().startswith("unreadable queue file")]
    assert sorted(errors) == ["bad", "lonely"]


def test_9_durability_folder_fsync_is_skipped_on_windows(tmp_path, monkeypatch):
    def no_folder_handles(path, flags, *args):
        raise PermissionError(13, "Permission denied", path)  # what Windows answers

    with monkeypatch.context() as patched:
        patched.setattr(os, "name", "nt")
        patched.setattr(os, "open", no_folder_handles)
        spool.sync_folder(str(tmp_path))
    spool.sync_folder(str(tmp_path))  # and on this system it really runs


def data_started(sink):
    """An Event set when `sink` has the whole body of a message and is about to answer."""
    started = threading.Event()
    answer = sink.handler.handle_DATA

    async def handle_DATA(server, session, envelope):
        started.set()
        return await answer(server, session, envelope)

    sink.handler.handle_DATA = handle_DATA
    return started


def test_9_shutdown_finishes_the_attempt_in_progress_and_keeps_the_rest(spool_relay, late_sink):
    down = late_sink()
    relay = spool_relay(remotes=down.url(), queue_retry_min="1h", queue_retry_max="1h")
    first = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    sink = down.up()
    sink.handler.delay = 0.5
    started = data_started(sink)
    print(spool.request_flush(relay.settings))
    assert started.wait(5)
    sink.handler.rcpt_reply = {"later@example.org": "451 4.2.0 not now"}
    second = queued_id(*send(relay, ["later@example.org"], MESSAGE))
    relay.stop()
    assert [m.content.count(first.encode()) for m in sink.box] == [1]
    assert files(relay.spool_dir) == [second + ".eml", second + ".json"]
    sink.handler.rcpt_reply = {}
    again = spool_relay(remotes=down.url(), queue_retry_min="1h", queue_retry_max="1h")
    assert again.spool.queued == 1  # the second only: the first is never sent again


def half_sent_message(port):
    """A client that got 354 and sent part of its body: it never gets a 250."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    sock.sendall(b"HELO c\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<half@example.org>\r\nDATA\r\n")
    for _ in range(3):
        assert reader.readline()[:3] in (b"250", b"354")
    sock.sendall(b"Subject: half\r\n\r\nnot finished\r\n")
    return sock


def test_9_restart_after_kill_9_every_250_arrives_and_nothing_else(spool_process, late_sink):
    down = late_sink()
    relay = spool_process({"remotes": down.url(), "queue_retry_min": "1h", "queue_retry_max": "1h"})
    ids = [queued_id(*send(relay, ["b@example.org"], MESSAGE)) for _ in range(3)]
    half = half_sent_message(relay.port)
    kill_9(relay)
    half.close()
    sink = down.up()
    again = spool_process({"remotes": down.url()})
    assert wait_until(lambda: "delivered" in again.stderr and len(sink.box) >= 3, 10)
    assert wait_until(lambda: files(again.spool_dir) == [], 5)
    assert sorted(i for m in sink.box for i in ids if i.encode() in m.content) == sorted(ids)
    assert all(b"not finished" not in m.content for m in sink.box) and len(sink.box) == 3


def test_9_restart_after_kill_9_in_the_middle_of_a_retry_delivers_at_least_once(spool_process, late_sink):
    down = late_sink()
    relay = spool_process({"remotes": down.url()})
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    sink = down.up()
    sink.handler.delay = 1.0
    started = data_started(sink)
    assert started.wait(5)  # the retry has sent the whole body and waits for the answer
    kill_9(relay)
    assert files(relay.spool_dir) == [message_id + ".eml", message_id + ".json"]
    sink.handler.delay = 0
    again = spool_process({"remotes": down.url()})
    assert wait_until(lambda: files(again.spool_dir) == [], 10)
    assert wait_until(lambda: len(sink.box) >= 1)
    assert all(message_id.encode() in m.content for m in sink.box) and len(sink.box) <= 2


def test_9_durability_without_syncfs_each_file_is_fsynced_on_its_own(spool_relay, late_sink, monkeypatch):
    # Only the spool sees Windows: no syncfs, so the per-file fsync path runs.
    monkeypatch.setattr(spool, "sys", SimpleNamespace(platform="win32"))
    relay = spool_relay(remotes=late_sink().url(), queue_retry_min="1h", queue_retry_max="1h")
    assert relay.spool._group is None
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert files(relay.spool_dir) == [message_id + ".eml", message_id + ".json"]
    with open(os.path.join(relay.spool_dir, "queue", message_id + ".eml"), "rb") as f:
        assert f.read().endswith(MESSAGE)
