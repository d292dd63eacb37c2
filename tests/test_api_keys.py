"""API keys: their text and hash, the stores (SQLite and the shared PostgreSQL database), and
``phoneagent keys create|list|revoke``: run as a real process against running servers, a key
works at once and its revocation holds from the next request, on every instance."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.api.key_store import KEYS_FILENAME, PostgresApiKeys, SQLiteApiKeys
from phoneagent.api.keys import KEY_PATTERN, hash_key, key_id_of, new_key
from phoneagent.cli import main
from phoneagent.config import Settings
from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.pg_outbox import PostgresOutbox
from phoneagent.testing.stack import LocalStack, demo_credentials

T0 = 1_800_000_000.0


# --- the key's text -------------------------------------------------------------------------


def test_a_new_key_is_random_and_only_its_hash_is_kept():
    key, text = new_key("crm", ["b", "a", "b"], now=T0)
    other, other_text = new_key("crm", [], now=T0)
    assert KEY_PATTERN.fullmatch(text) and text.startswith(f"pa_{key.id}_")
    assert text != other_text and key.id != other.id
    assert key.key_hash == hash_key(text) and text not in repr(key)
    assert key.personas == ("b", "a")  # in order, each once
    assert key.matches(text) and not key.matches(other_text) and not key.matches("")
    assert key_id_of(text) == key.id
    for malformed in ("", "pa_", text + "0", text.upper(), "Bearer " + text, text[:-1]):
        assert key_id_of(malformed) is None
    assert key.allows("a") and not key.allows("c")
    assert other.allows("anything")  # no personas: every persona


# --- the stores -----------------------------------------------------------------------------


@pytest.fixture
async def key_store(store_backend, tmp_path):
    _, url = store_backend
    if url is None:
        store = SQLiteApiKeys.in_data_dir(tmp_path / "data")
        yield store
        await store.close()
    else:
        outbox = await PostgresOutbox.open(url)  # migrates, step 8 included
        yield PostgresApiKeys(outbox)
        await outbox.close()


async def test_a_store_keeps_lists_and_revokes_keys(key_store):
    first, _ = new_key("first", ["trattoria-luca", "renxin-clinic"], now=T0)
    second, _ = new_key("", [], now=T0 + 1)
    assert await key_store.list() == []
    await key_store.add(first)
    await key_store.add(second)
    assert await key_store.get(first.id) == first
    assert await key_store.get("0" * 12) is None
    assert await key_store.list() == [first, second]
    revoked = await key_store.revoke(first.id, at=T0 + 5)
    assert revoked is not None and revoked.revoked_at == T0 + 5
    again = await key_store.revoke(first.id, at=T0 + 9)  # keeps the first time
    assert again is not None and again.revoked_at == T0 + 5
    assert (await key_store.get(first.id)).revoked_at == T0 + 5
    assert (await key_store.get(second.id)).revoked_at is None
    assert await key_store.revoke("0" * 12, at=T0) is None


async def test_a_key_id_is_unique(key_store):
    key, _ = new_key("x", [], now=T0)
    await key_store.add(key)
    with pytest.raises(OutboxError):
        await key_store.add(key)


async def test_a_key_file_from_a_newer_phoneagent_is_refused(tmp_path):
    path = tmp_path / KEYS_FILENAME
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    store = SQLiteApiKeys(path)
    with pytest.raises(OutboxError, match="newer phoneagent"):
        await store.get("0" * 12)
    await store.close()


async def test_an_unwritable_data_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SQLiteApiKeys.in_data_dir(blocker / "data")
    with pytest.raises(OutboxError, match="PHONEAGENT_DATA_DIR"):
        await store.list()
    await store.close()


# --- the commands ---------------------------------------------------------------------------


def test_create_list_and_revoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PHONEAGENT_PERSONAS_DIR", str(EXAMPLE_PERSONAS))
    data = str(tmp_path / "data")
    assert main(["keys", "list", "--data-dir", data]) == 0
    assert "no API keys" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()  # listing created nothing
    assert main(["keys", "create", "--name", "CRM", "--persona", "trattoria-luca",
                 "--data-dir", data]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    [text] = out.splitlines()  # the key alone on stdout: a script captures it
    assert KEY_PATTERN.fullmatch(text)
    key_id = key_id_of(text)
    assert "never again" in err and key_id in err and text not in err
    assert main(["keys", "create", "--data-dir", data]) == 0
    everything = capsys.readouterr().out.strip()
    assert main(["keys", "list", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "PERSONAS"]
    assert lines[1].split()[:3] == [key_id, "CRM", "trattoria-luca"]
    assert "every persona" in lines[2] and lines[1].endswith("-")
    assert text not in out and text[16:] not in out and everything[16:] not in out
    assert main(["keys", "revoke", key_id, "--data-dir", data]) == 0
    assert f"revoked API key {key_id} (CRM) now" in capsys.readouterr().out
    assert main(["keys", "revoke", f"pa_{key_id}", "--data-dir", data]) == 0
    assert "already" in capsys.readouterr().out
    assert main(["keys", "list", "--data-dir", data]) == 0
    assert not capsys.readouterr().out.splitlines()[1].endswith("-")  # a revocation time


def test_the_commands_refuse_what_is_wrong(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PHONEAGENT_PERSONAS_DIR", str(EXAMPLE_PERSONAS))
    data = str(tmp_path / "data")
    assert main(["keys", "create", "--persona", "../etc", "--data-dir", data]) == 2
    assert "not a persona id" in capsys.readouterr().err
    assert main(["keys", "create", "--name", "a\nb", "--data-dir", data]) == 2
    assert "--name" in capsys.readouterr().err
    assert main(["keys", "revoke", "nope", "--data-dir", data]) == 2
    assert "not a key id" in capsys.readouterr().err
    assert main(["keys", "revoke", "0" * 12, "--data-dir", data]) == 1
    assert "no API key" in capsys.readouterr().err
    # A persona not (yet) in the personas directory: a warning, the key is made.
    assert main(["keys", "create", "--persona", "next-year", "--data-dir", data]) == 0
    out, err = capsys.readouterr()
    assert "warning: no persona 'next-year'" in err and KEY_PATTERN.fullmatch(out.strip())
    assert not list((tmp_path / "data").glob("*.sqlite3-journal"))


def test_the_commands_use_the_shared_database(pg_database, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PHONEAGENT_DATABASE_URL", pg_database)
    monkeypatch.setenv("PHONEAGENT_DATA_DIR", str(tmp_path / "data"))
    assert main(["keys", "create", "--name", "shared"]) == 0
    text = capsys.readouterr().out.strip()
    assert main(["keys", "list"]) == 0
    assert key_id_of(text) in capsys.readouterr().out
    assert not (tmp_path / "data" / KEYS_FILENAME).exists()  # in the database, not a file
    assert main(["keys", "revoke", key_id_of(text)]) == 0


def test_an_unreachable_database_is_named_without_its_password(capsys, monkeypatch):
    monkeypatch.setenv("PHONEAGENT_DATABASE_URL", "postgresql://u:hunter2pw@127.0.0.1:9/db")
    assert main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert "API key store error" in err and "hunter2pw" not in err


# --- the commands against running servers ----------------------------------------------------


async def keys_command(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """``phoneagent keys …`` as a real process: (exit status, stdout)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phoneagent.cli", "keys", *args,
        env=os.environ | env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    return process.returncode, out.decode()


async def status_of(stack: LocalStack, text: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{stack.base_url}/api/v1/personas", headers={"Authorization": f"Bearer {text}"}
        ) as response,
    ):
        return response.status


async def test_a_key_made_by_the_command_works_and_its_revocation_holds_at_once(api_stack):
    env = {"PHONEAGENT_DATA_DIR": str(api_stack.settings.data_dir)}
    code, out = await keys_command("create", "--name", "ops", env=env)
    assert code == 0
    text = out.strip()
    assert await status_of(api_stack, text) == 200
    code, _ = await keys_command("revoke", key_id_of(text), env=env)
    assert code == 0
    assert await status_of(api_stack, text) == 401


async def test_a_revocation_holds_at_once_on_every_instance(pg_database, tmp_path: Path):
    account_sid, auth_token = demo_credentials()
    stacks = []
    try:
        for name in ("one", "two"):
            settings = Settings(
                twilio_account_sid=account_sid,
                twilio_auth_token=auth_token,
                personas_dir=EXAMPLE_PERSONAS,
                data_dir=tmp_path / name,
                database_url=pg_database,
            )
            stacks.append(LocalStack(EXAMPLE_PERSONAS, settings=settings))
            await stacks[-1].start()
        env = {"PHONEAGENT_DATABASE_URL": pg_database, "PHONEAGENT_DATA_DIR": str(tmp_path)}
        code, out = await keys_command("create", "--persona", "trattoria-luca", env=env)
        assert code == 0
        text = out.strip()
        assert [await status_of(stack, text) for stack in stacks] == [200, 200]
        code, _ = await keys_command("revoke", key_id_of(text), env=env)
        assert code == 0
        assert [await status_of(stack, text) for stack in stacks] == [401, 401]
    finally:
        for stack in stacks:
            await stack.close()


async def test_a_key_store_that_cannot_be_read_answers_503_not_401(tmp_path: Path):
    account_sid, auth_token = demo_credentials()
    data = tmp_path / "data"
    (data / KEYS_FILENAME).mkdir(parents=True)  # where the file should be: SQLite cannot open it
    settings = Settings(
        twilio_account_sid=account_sid,
        twilio_auth_token=auth_token,
        personas_dir=EXAMPLE_PERSONAS,
        data_dir=data,
    )
    _, text = new_key("x", [], now=T0)
    async with LocalStack(EXAMPLE_PERSONAS, settings=settings) as stack:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{stack.base_url}/api/v1/calls", headers={"Authorization": f"Bearer {text}"}
            ) as response,
        ):
            assert response.status == 503
            assert response.headers["Retry-After"] == "5"
            error = (await response.json())["error"]
        assert error["code"] == "store_unavailable"
        assert str(data) not in error["message"]  # the operator's log names the file, not this
