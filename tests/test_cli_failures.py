"""How the command line ends, in-process: one line and a documented exit code per kind of
failure, the traceback of an unexpected error in the CLI log (never on the terminal)."""

from __future__ import annotations

import errno

import pytest

from privifs.cli import main
from privifs.cli.failures import report
from privifs.errors import IntegrityError, NotFoundError, ServerUnreachable, WrongKeyError


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "privifs"


@pytest.mark.parametrize(
    "exc, code",
    [
        (NotFoundError("token x does not exist"), 1),
        (WrongKeyError("wrong key"), 3),
        (OSError(errno.ENOENT, "No such file or directory", "/nope"), 4),
        (ServerUnreachable("cannot reach"), 5),
        (IntegrityError("tampered"), 6),
        (ExceptionGroup("nursery", [WrongKeyError("wrong key inside a nursery")]), 3),
        (KeyboardInterrupt(), 130),
    ],
)
def test_each_kind_of_failure_has_its_exit_code_and_one_line(exc, code, capsys, state):
    assert report(exc, debug=False) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (state / "cli.log").exists()


def test_an_os_error_names_the_file(capsys, state):
    report(OSError(errno.EACCES, "Permission denied", "/root/secret"), debug=False)
    assert capsys.readouterr().err == "privifs: error: Permission denied: /root/secret\n"


def test_an_unexpected_error_points_to_the_log_with_the_traceback(capsys, state):
    def buggy():
        raise RuntimeError("a bug")

    try:
        buggy()
    except RuntimeError as exc:
        assert report(exc, debug=False) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "a bug" in err and str(state / "cli.log") in err
    log = (state / "cli.log").read_text()
    assert "Traceback" in log and "in buggy" in log
    assert (state / "cli.log").stat().st_mode & 0o077 == 0


def test_a_broken_pipe_inside_a_nursery_ends_quietly(capsys, state):
    assert report(ExceptionGroup("nursery", [BrokenPipeError(errno.EPIPE, "Broken pipe")]), debug=False) == 141
    assert capsys.readouterr().err == ""


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["mount", "/mnt", "--refresh-interval", "-5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--refresh-interval" in err and "at least 0.1 seconds" in err
