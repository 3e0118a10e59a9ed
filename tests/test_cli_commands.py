"""A command line loads only the module of the command it names (privifs.cli.commands)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import privifs
from privifs.cli import build_parser, main
from privifs.cli.commands import COMMANDS, named_command
from privifs.cli.failures import EXIT_UNREACHABLE
from tests.test_cli_failures import unreachable_server_config


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


@pytest.mark.parametrize("argv, says", [(["status"], "no privifs mounts"), (["--version"], "privifs 0.")])
def test_a_privifs_directory_in_the_working_directory_does_not_break_the_command_line(argv, says, tmp_path):
    """``python -m privifs status`` run in a directory holding an empty ``privifs/`` failed with an
    AttributeError: that directory is imported as a namespace package ``privifs`` (no docstring,
    no ``__version__``) while the commands come from the package installed in editable mode
    (setuptools' finder, which comes after the path's). Here that finder is stood in for."""
    package = Path(privifs.__file__).resolve().parent
    code = (
        "import os, runpy, sys\n"
        "from importlib.machinery import PathFinder\n"
        f"REAL = {str(package)!r}\n"
        "class Editable:\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name.rpartition('.')[0] == 'privifs':\n"
        "            return PathFinder.find_spec(name, path=[REAL])\n"
        "        return None\n"
        "sys.path = [''] + [p for p in sys.path[1:] if os.path.realpath(p) != os.path.dirname(REAL)]\n"
        "sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, Editable)  # before an installed one\n"
        "import privifs\n"
        "assert privifs.__file__ is None, privifs.__file__  # the empty directory's namespace package\n"
        f"sys.argv = ['privifs', *{argv!r}]\n"
        "runpy.run_module('privifs', run_name='__main__', alter_sys=True)\n"
    )
    (tmp_path / "privifs").mkdir()
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path)},
    )
    assert r.returncode == 0 and says in r.stdout and "Traceback" not in r.stderr, (r.stdout, r.stderr)


def _parsers(parser, name="privifs"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_argument_has_help_and_the_help_says_what_the_commands_do():
    """A new user's reading of --help: the mountpoint of status and umount (and the token of
    token get/rm/mv/stat) had no help text; 'token ls --all' said it adds the key check, and it
    lists big files' parts too; 'token rm' did not say that a manifest's parts go with it."""
    parsers = dict(_parsers(build_parser()))
    for name, parser in parsers.items():
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):  # (its commands have theirs)
                assert action.help, f"{name}: {action.dest} has no help"
    ls_all = next(a for a in parsers["privifs token ls"]._actions if a.dest == "all")
    assert "key check" in ls_all.help and "parts" in ls_all.help
    assert "its parts too" in parsers["privifs token rm"].format_help()


def test_verify_help_names_the_exit_code_of_an_unreachable_server(tmp_path, capsys, monkeypatch):
    """'verify --help' listed 0, 3 and 1; a server that cannot be reached exits 5."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cfg = unreachable_server_config(tmp_path)
    assert main(["--config", str(cfg), "verify"]) == EXIT_UNREACHABLE
    assert "cannot reach" in capsys.readouterr().err
    verify_help = dict(_parsers(build_parser(["verify"])))["privifs verify"].format_help()
    assert f"{EXIT_UNREACHABLE} the server cannot be reached" in " ".join(verify_help.split())


@pytest.mark.parametrize("argv", [["mount", "--config", "CFG", "DIR"], ["token", "ls", "--config", "CFG"]])
def test_config_may_follow_the_command(argv, tmp_path):
    """'privifs mount --config FILE DIR' (the README names the option and then the command)
    failed with "unrecognized arguments: --config DIR", naming the mountpoint as the file."""
    cfg = tmp_path / "my.toml"
    argv = [str(cfg) if a == "CFG" else str(tmp_path) if a == "DIR" else a for a in argv]
    assert build_parser(argv).parse_args(argv).config == cfg
    before = ["--config", str(cfg), *(a for a in argv if a not in ("--config", str(cfg)))]
    assert build_parser(before).parse_args(before).config == cfg  # (before the command, as ever)
