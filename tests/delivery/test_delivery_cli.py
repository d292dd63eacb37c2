"""``phoneagent events list`` and ``events redeliver`` (handlers driven through their parser)."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3

import pytest
from delivery_helpers import SECRET_ENV, T0, ended_event

from phoneagent.delivery.cli import add_events_commands
from phoneagent.delivery.outbox import OUTBOX_FILENAME, SQLiteOutbox

URL = "https://user:pw@crm.example/hooks/calls?token=s3cret"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="phoneagent")
    add_events_commands(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.handler(args)


def seed(data_dir) -> dict[str, str]:
    """Three events: one delivered, one dead letter, one waiting for a retry."""

    async def go():
        box = await SQLiteOutbox.in_data_dir(data_dir)
        events = {name: ended_event(i) for i, name in enumerate(["ok", "dead", "later"])}
        for i, event in enumerate(events.values()):
            await box.enqueue(event, url=URL, secret_env=SECRET_ENV, now=T0 + i)
        claims = {i.id: i.claim for i in await box.claim_due(now=T0 + 5, limit=3, lease=30)}
        ok, dead, later = events.values()
        await box.mark_delivered(ok.id, claims[ok.id], now=T0 + 6, status=200)
        gone = "HTTP 410 Gone: the receiver no longer wants these events"
        await box.mark_dead(dead.id, claims[dead.id], now=T0 + 6, status=410, error=gone)
        await box.mark_retry(later.id, claims[later.id], now=T0 + 6, at=T0 + 300, status=503,
                             error="HTTP 503: " + "busy " * 40)  # fmt: skip
        await box.close()
        return {name: event.id for name, event in events.items()}

    return asyncio.run(go())


def test_list_shows_every_event_newest_first_without_url_secrets(tmp_path, capsys):
    ids = seed(tmp_path)
    assert run("events", "list", "--data-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "TYPE", "STATUS", "TRIES"]
    assert [line.split()[0] for line in lines[1:4]] == [ids["later"], ids["dead"], ids["ok"]]
    assert "https://crm.example/hooks/calls" in out
    assert "s3cret" not in out and "pw@" not in out
    assert "410 Gone" in out and "…" in out  # long errors are cut
    assert lines[-1] == "3 events: 1 pending, 1 failed, 1 delivered"


@pytest.mark.parametrize(("status", "name"), [("failed", "dead"), ("pending", "later")])
def test_list_by_status(tmp_path, capsys, status, name):
    ids = seed(tmp_path)
    assert run("events", "list", "--status", status, "--data-dir", str(tmp_path)) == 0
    rows = capsys.readouterr().out.splitlines()[1:-1]
    assert [row.split()[0] for row in rows] == [ids[name]]


def test_list_uses_phoneagent_data_dir(tmp_path, capsys, monkeypatch):
    ids = seed(tmp_path)
    monkeypatch.setenv("PHONEAGENT_DATA_DIR", str(tmp_path))
    assert run("events", "list", "--limit", "1") == 0
    out = capsys.readouterr().out
    assert ids["later"] in out and ids["ok"] not in out
    assert "showing the newest 1" in out


def test_list_without_an_outbox_creates_nothing(tmp_path, capsys):
    assert run("events", "list", "--data-dir", str(tmp_path / "none")) == 0
    assert "no events yet" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_redeliver_queues_a_dead_letter_again(tmp_path, capsys):
    ids = seed(tmp_path)
    assert run("events", "redeliver", ids["dead"], "--data-dir", str(tmp_path)) == 0
    assert f"queued {ids['dead']}" in capsys.readouterr().out

    async def state():
        box = await SQLiteOutbox.in_data_dir(tmp_path)
        item = await box.get(ids["dead"])
        await box.close()
        return item

    item = asyncio.run(state())
    assert (item.status, item.attempts) == ("pending", 0)


def test_redeliver_all_failed_and_unknown_ids(tmp_path, capsys):
    ids = seed(tmp_path)
    assert run("events", "redeliver", "--all-failed", "--data-dir", str(tmp_path)) == 0
    assert f"queued {ids['dead']}" in capsys.readouterr().out
    assert run("events", "redeliver", "evt_unknown", "--data-dir", str(tmp_path)) == 1
    assert "no event evt_unknown" in capsys.readouterr().err
    assert run("events", "redeliver", "--data-dir", str(tmp_path)) == 2


def test_a_corrupt_outbox_is_a_clear_error(tmp_path, capsys):
    (tmp_path / OUTBOX_FILENAME).write_bytes(b"\x00garbage" * 512)
    assert run("events", "list", "--data-dir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / OUTBOX_FILENAME) in err and "not a readable SQLite database" in err


def test_a_locked_outbox_is_a_clear_error(tmp_path, capsys, monkeypatch):
    seed(tmp_path)
    monkeypatch.setattr("phoneagent.delivery.cli.BUSY_TIMEOUT", 0.05)
    holder = sqlite3.connect(tmp_path / OUTBOX_FILENAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert run("events", "redeliver", "--all-failed", "--data-dir", str(tmp_path)) == 2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "locked by another process" in capsys.readouterr().err
