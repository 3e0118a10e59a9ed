"""A command line loads only the module of the command it names (privifs.cli.commands)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from privifs.cli import build_parser
from privifs.cli.commands import COMMANDS, named_command


@pytest.mark.parametrize("argv", [["status"], ["umount", "/nowhere"], ["--config", "/x.toml", "status"]])
def test_status_and_umount_load_neither_the_client_nor_the_daemon(argv, tmp_path):
    """``privifs status`` imported the daemon, the client, trio and httpx (0.5 s of CPU for each
    status or umount; a test suite runs thousands)."""
    code = (
        "import sys\n"
        "from privifs.cli import main\n"
        f"main({argv!r})\n"
        "heavy = sorted(m for m in ('trio', 'httpx', 'pyfuse3', 'privifs.fs.daemon', 'privifs.client.transport') "
        "if m in sys.modules)\n"
        "print('LOADED', heavy)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path)},
    )
    assert "LOADED []" in r.stdout, (r.stdout, r.stderr)


def test_every_command_is_in_the_table_and_the_whole_parser_still_knows_them_all():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)
    for command in COMMANDS:
        assert named_command(["--debug", "--config", "x", command, "--help"]) == command
        own = next(a for a in build_parser([command])._actions if a.dest == "command").choices[command]
        assert len(own._actions) > 1, f"{command}: only its help was registered"
    assert named_command(["--bogus"]) is None and named_command(["nonsense"]) is None
