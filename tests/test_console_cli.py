"""``phoneagent console hash-password``, run as a real process: from a pipe, and at a real
terminal (a pseudo-terminal), where the password must not be echoed."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from conftest import PROJECT_ROOT, VALID_ENV

from phoneagent.config import load_settings
from phoneagent.console.auth import ConsoleKeys

PASSWORD = "a long enough console password"
COMMAND = [sys.executable, "-m", "phoneagent.cli", "console", "hash-password"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PHONEAGENT_")}


def hash_from_pipe(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        COMMAND, input=text, capture_output=True, text=True, env=ENV, cwd=PROJECT_ROOT, timeout=30
    )


def test_a_password_from_stdin_prints_only_its_hash_which_the_console_accepts():
    result = hash_from_pipe(PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    [hashed] = result.stdout.splitlines()
    assert hashed.startswith("scrypt$") and PASSWORD not in result.stdout + result.stderr
    assert "PHONEAGENT_CONSOLE_PASSWORD" in result.stderr
    keys = ConsoleKeys(hashed, "twilio-auth-token-value")
    assert keys.password_matches(PASSWORD) and not keys.password_matches(PASSWORD + "\n")
    settings = load_settings(VALID_ENV | {"PHONEAGENT_CONSOLE_PASSWORD": hashed})
    assert settings.console_password == hashed
    # A fresh salt each time: two hashes of one password differ, and both match it.
    again = hash_from_pipe(PASSWORD + "\r\n").stdout.strip()
    assert again != hashed and ConsoleKeys(again, "x").password_matches(PASSWORD)


def test_a_short_or_missing_password_is_refused_and_nothing_is_printed():
    for text in ("short\n", "", "\n"):
        result = hash_from_pipe(text)
        assert result.returncode == 1
        assert result.stdout == ""
        assert "too short: at least 12 characters" in result.stderr


class Terminal:
    """The command on a pseudo-terminal: what a person typing at it sees and types."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            COMMAND,
            stdin=slave,
            stdout=subprocess.PIPE,  # the hash, kept apart from what the terminal shows
            stderr=slave,
            env=ENV,
            cwd=PROJECT_ROOT,
            start_new_session=True,  # no controlling terminal: getpass uses this one (stdin)
        )
        os.close(slave)
        self.screen = b""

    def wait_for(self, text: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0, f"waited for {text!r}; the terminal shows {self.screen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.screen += os.read(self.master, 1024)
                except OSError:  # the command exited and closed the terminal
                    break

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def finish(self) -> tuple[int, str]:
        stdout, _ = self.process.communicate(timeout=30)
        self.wait_for(b"", timeout=0.1)
        os.close(self.master)
        return self.process.returncode, stdout.decode()


def test_at_a_terminal_the_password_is_asked_twice_without_echo():
    terminal = Terminal()
    terminal.wait_for(b"Console password: ")
    terminal.type(PASSWORD)
    terminal.wait_for(b"Again: ")
    terminal.type(PASSWORD)
    code, stdout = terminal.finish()
    assert code == 0
    assert ConsoleKeys(stdout.strip(), "x").password_matches(PASSWORD)
    assert PASSWORD.encode() not in terminal.screen  # never echoed


def test_at_a_terminal_two_different_passwords_print_nothing():
    terminal = Terminal()
    terminal.wait_for(b"Console password: ")
    terminal.type(PASSWORD)
    terminal.wait_for(b"Again: ")
    terminal.type(PASSWORD + "!")
    terminal.wait_for(b"differ")
    code, stdout = terminal.finish()
    assert code == 1 and stdout == ""
