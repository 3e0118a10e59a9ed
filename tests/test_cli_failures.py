"""How the command line ends, in-process: one line and a documented exit code per kind of
failure, the traceback of an unexpected error in the CLI log (never on the terminal)."""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

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
    assert main(["verify", "--repair"]) == 2  # options that only go together: a usage error too
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repair needs --data" in err


@pytest.mark.timeout(60)  # without the fix, the FIFOs block (the FIFO key comes before /dev/zero)
def test_a_broken_configuration_or_secret_file_is_one_clear_line(tmp_path, capsys, state, monkeypatch):
    """A configuration or password file that is not UTF-8, a [server] that is not a section:
    'internal error: UnicodeDecodeError / AttributeError …' (exit 70); a FIFO as the
    configuration, key, password or passphrase file blocked the command forever and /dev/zero as
    the key file filled the memory."""
    os.environ.pop("PRIVIFS_BACKUP_PASSPHRASE", None)
    key = tmp_path / "aes.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    password = tmp_path / "password"
    password.write_text("pw\n")
    password.chmod(0o600)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)

    def config(name: str, text: str | bytes) -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def account(key_file: Path = key, password_file: Path = password) -> str:
        return (
            '[server]\nembedded = false\napi = "http://127.0.0.1:9"\n[account]\nusername = "u"\n'
            f'password_file = "{password_file}"\n[keys]\naes_key_file = "{key_file}"\n'
        )

    (tmp_path / "latin1").write_bytes(b"\xe9t\xe9\n")
    (tmp_path / "latin1").chmod(0o600)
    (tmp_path / "empty").write_bytes(b"\n")  # (the server said "HTTP 422", naming no file: helper hK)
    (tmp_path / "empty").chmod(0o600)
    cases = [
        (config("latin1.toml", b"\xff\xfe[server]\n"), "not UTF-8"),
        (config("number.toml", "server = 5\n"), "[server] section"),
        (config("mount.toml", "mount = 3\n" + account()), "[mount] section"),
        (str(fifo), "not a regular file"),
        (config("fifokey.toml", account(key_file=fifo)), "not a regular file"),
        (config("zerokey.toml", account(key_file=Path("/dev/zero"))), "not a regular file"),
        (config("fifopw.toml", account(password_file=fifo)), "not a regular file"),
        (config("latin1pw.toml", account(password_file=tmp_path / "latin1")), "not UTF-8"),
        (config("emptypw.toml", account(password_file=tmp_path / "empty")), "is empty"),
        # a value of the wrong type was used as it came: "false" (a string) meant the embedded engine
        (config("strbool.toml", account().replace("embedded = false", 'embedded = "false"')), "true or false"),
        (config("numkey.toml", account().replace(f'aes_key_file = "{key}"', "aes_key_file = 5")), "text in quotes"),
        # nested past the parser's limit: a RecursionError, exit 70 'internal error' (helper hAM F2)
        (config("deep.toml", "[mount]\nx = " + "[" * 500 + "]" * 500 + "\n"), "too deeply"),
    ]
    for cfg, says in cases:
        code = main(["--config", cfg, "token", "ls"])
        err = capsys.readouterr().err
        assert code == 3, (cfg, code, err)
        assert err.count("\n") == 1 and says in err and "internal error" not in err, (cfg, err)
    with tarfile.open(tmp_path / "x.backup", "w"):  # a tar (restore says a missing backup first)
        pass
    code = main(["restore", str(tmp_path / "x.backup"), "--passphrase-file", str(fifo)])
    err = capsys.readouterr().err
    assert code == 3 and "not a regular file" in err, err
    shared = tmp_path / "passphrase"  # a secret other users can read, as key and password files
    shared.write_text("correct horse battery staple\n")
    shared.chmod(0o644)
    code = main(["restore", str(tmp_path / "x.backup"), "--passphrase-file", str(shared)])
    err = capsys.readouterr().err
    assert code == 3 and "accessible by other users" in err and "chmod 600" in err, err
    assert not (state / "cli.log").exists()


@pytest.mark.timeout(60)  # without the fix, the FIFO blocks
def test_junk_in_the_mount_registry_is_dropped_not_an_internal_error(tmp_path, capsys, state, monkeypatch):
    """An entry in $XDG_RUNTIME_DIR/privifs/mounts that was JSON but not a mount's entry made
    'privifs status' and 'privifs umount' end in 'internal error: TypeError …' (exit 70); a
    FIFO there blocked them."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    registry = tmp_path / "run" / "privifs" / "mounts"
    registry.mkdir(parents=True)
    for name, text in (("list", "[1, 2]"), ("number", '{"mountpoint": 5, "pid": 1}'), ("junk", "garbage")):
        (registry / f"{name}.json").write_text(text)
    os.mkfifo(registry / "fifo.json")
    assert main(["status"]) == 0
    assert main(["umount", str(tmp_path)]) == 4  # (README: a local directory)
    err = capsys.readouterr().err
    assert "internal error" not in err and "is not a privifs mount" in err, err
    assert list(registry.iterdir()) == []


def test_an_argument_that_is_not_utf8_does_not_break_the_cli_log(capsys, state, monkeypatch):
    """With a non-UTF-8 byte in the command line (a lone surrogate in sys.argv), writing the
    internal error to the CLI log failed itself: '--- Logging error --- Traceback …' on the
    terminal."""
    monkeypatch.setattr("sys.argv", ["privifs", "token", "put", "f", "--name", "\udcff"])
    assert report(RuntimeError("a bug"), debug=False) == 70
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err and err.count("\n") == 1, err
    assert "\\udcff" in (state / "cli.log").read_text()


def test_init_refuses_settings_that_are_not_utf8(tmp_path, capsys, state, monkeypatch):
    """PRIVICORE_USERNAME or PRIVICORE_PASSWORD holding a non-UTF-8 byte ended 'privifs init'
    in 'internal error: UnicodeEncodeError: … surrogates not allowed' (exit 70), and the API
    URL 'http://\\xff' in 'internal error: InvalidURL'."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("PRIVICORE_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PRIVICORE_USERNAME", "someone@example.com")
    monkeypatch.setenv("PRIVICORE_PASSWORD", "a-password")
    for name, value in (
        ("PRIVICORE_USERNAME", "\udcff"),
        ("PRIVICORE_PASSWORD", "pw\udcff"),
        ("PRIVICORE_API_URL", "http://\udcff"),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert main(["init"]) == 3
        err = capsys.readouterr().err
        assert f"{name} is not valid UTF-8" in err and err.count("\n") == 1, err
    assert not (tmp_path / "config" / "privifs" / "aes.key").exists()
    assert not (state / "cli.log").exists()


def test_a_mountpoint_that_is_not_utf8_is_refused_in_one_line(tmp_path, capsys, state, monkeypatch):
    """'privifs mount DIR' with a non-UTF-8 byte in DIR's path started the daemon, which failed
    writing the path into its state: 'the mount failed (UnicodeEncodeError: … surrogates not
    allowed)' and an internal error in the mount log."""
    for name in ("CONFIG", "DATA", "CACHE", "STATE"):  # nothing may reach the real home, fix or not
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / name.lower()))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/\xff"))
    odd.mkdir()
    assert main(["mount", str(odd)]) == 3
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and err.count("\n") == 1, err
    assert not (tmp_path / "config" / "privifs").exists() and not (tmp_path / "data").exists()


def test_the_dead_mount_recovery_command_can_be_pasted_into_a_shell():
    import shlex

    from privifs.cli.status_cmd import _dead_status

    mountpoint = "/mnt/my vault; rm -rf ~"
    command = _dead_status(mountpoint)["recover"].split("   (or just:")[0]
    assert shlex.split(command) == ["privifs", "umount", mountpoint, "&&", "privifs", "mount", mountpoint]


def test_a_mountpoint_that_is_missing_or_a_file_is_a_local_file_error(tmp_path, capsys, state):
    (tmp_path / "file").write_text("")
    for where in (tmp_path / "missing", tmp_path / "file"):
        code = main(["mount", str(where)])
        err = capsys.readouterr().err
        assert code == 4 and err.count("\n") == 1 and "does not exist or is not a directory" in err, err


@pytest.mark.timeout(60)  # without the fix, the engine starts and runs until stopped
def test_the_engine_never_overwrites_a_file_that_is_not_its_urls_file(tmp_path, capsys, state):
    """'privifs engine --urls-file ~/.config/privifs/aes.key' replaced the key (0600) with the
    URLs as JSON, mode 0644: a mistyped option destroyed the vault's only key. The engine now
    replaces only a URLs file (one it wrote before, e.g. at its last start)."""
    secret = tmp_path / "aes.key"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    args = ["engine", "--data-dir", str(tmp_path / "data"), "--urls-file", str(secret)]
    args += ["--api-port", "0", "--ws-port", "0", "--upstream-port", "0", "--downstream-port", "0"]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(secret) in err and "never overwrites" in err
    assert secret.read_text() == "ab" * 32 + "\n" and secret.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "data").exists()  # refused before anything started
    from privifs.cli.engine_cmd import check_urls_file

    previous = tmp_path / "urls.json"
    previous.write_text('{"api": "http://127.0.0.1:1", "ws": "ws://127.0.0.1:2"}\n')
    check_urls_file(previous)  # a URLs file from the last start: replaced
    check_urls_file(tmp_path / "new.json")  # a new file: written
    (tmp_path / "empty.json").touch()
    check_urls_file(tmp_path / "empty.json")  # empty (a power cut after an older engine wrote it): written


def test_a_json_state_file_is_flushed_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """A power cut after an engine wrote its --urls-file left the rename on disk and not the
    content: an empty file, which the next start refused (helper hN). The content is flushed
    before the rename."""
    from privifs import paths

    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    paths.write_json(tmp_path / "urls.json", {"api": "http://127.0.0.1:1"})
    assert order == ["fsync", "replace"]
    assert json.loads((tmp_path / "urls.json").read_text()) == {"api": "http://127.0.0.1:1"}


@pytest.mark.timeout(120)
def test_a_configuration_named_like_a_secret_beside_it_is_refused_before_anything_is_written(
    tmp_path, capsys, state, monkeypatch
):
    """'privifs --config ~/.config/privifs/aes.key init --force' wrote the configuration over the
    AES key (the key is kept beside the configuration under that very name), and
    'privifs --config DIR/aes.key restore B' restored the key, then the configuration over it:
    the vault could no longer be decrypted. Such a configuration path is now refused at once."""
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir(mode=0o700)
    key = cfg_dir / "aes.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    before = key.read_bytes()
    for name, args in (
        ("aes.key", ["init", "--force"]),
        ("password", ["init"]),
        ("identity.key", ["restore", str(tmp_path / "some.backup")]),
        ("oauth.json", ["mount", str(tmp_path)]),
    ):
        assert main(["--config", str(cfg_dir / name), *args]) == 3, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "config.toml" in err and name in err, err
    assert key.read_bytes() == before
    assert sorted(p.name for p in cfg_dir.iterdir()) == ["aes.key"]
    assert not (tmp_path / "xdg_data_home").exists()


@pytest.mark.timeout(120)
def test_a_configuration_every_user_may_replace_is_refused_with_the_chmod_to_run(tmp_path, capsys, state, monkeypatch):
    """A configuration directory of mode 0777 was used as any other (helper hY): another local
    user could put a configuration and a key of their own there, and read what is stored next.
    Such a directory or file is refused by every command and by init, naming the chmod; a
    directory with the sticky bit (like /tmp) and a group-writable one (umask 002) are not."""
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    cfg = cfg_dir / "config.toml"
    cfg.write_text('[server]\nembedded = false\napi = "http://127.0.0.1:9"\n')
    for mode, target, refused in (
        (0o777, cfg_dir, True),
        (0o755, cfg_dir, False),
        (0o1777, cfg_dir, False),
        (0o775, cfg_dir, False),
        (0o666, cfg, True),
    ):
        cfg_dir.chmod(0o700)
        cfg.chmod(0o600)
        target.chmod(mode)
        code = main(["--config", str(cfg), "token", "ls"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        if refused:
            assert code == 3 and "writable by every user" in err and f"chmod o-w {target}" in err, err
        else:
            assert "writable by every user" not in err, (mode, err)
    cfg_dir.chmod(0o777)
    assert main(["--config", str(cfg_dir / "new.toml"), "init"]) == 3
    assert "writable by every user" in capsys.readouterr().err
    assert not (cfg_dir / "new.toml").exists() and not (cfg_dir / "aes.key").exists()


def test_a_command_without_a_runtime_dir_also_looks_in_the_login_sessions(tmp_path, monkeypatch):
    """A mount started in a login shell registers in /run/user/UID/privifs; 'privifs umount' run
    from cron or a boot script (no XDG_RUNTIME_DIR) looked only in the state directory and
    refused the mount as 'served by a privifs daemon this user did not start'."""
    from privifs import paths

    session = tmp_path / "run-user"
    (session / str(os.getuid())).mkdir(parents=True)
    monkeypatch.setattr(paths, "SESSION_RUNTIME", session)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert paths.runtime_dirs() == [tmp_path / "state" / "privifs" / "run", session / str(os.getuid()) / "privifs"]
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))  # a login shell: its own, then the state's
    assert paths.runtime_dirs() == [tmp_path / "xdg" / "privifs", tmp_path / "state" / "privifs" / "run"]


def test_a_backup_file_that_is_missing_or_in_a_missing_directory_is_a_local_file_error(
    tmp_path, capsys, state, monkeypatch
):
    """A missing output directory or backup file exited 3 (BackupError is a ConfigError) where
    token put/get exit 4 for their files; now 4 as well (a backup's target before its passphrase is asked)."""
    monkeypatch.setenv("PRIVIFS_BACKUP_PASSPHRASE", "correct horse battery staple")
    cfg = unreachable_server_config(tmp_path)
    (tmp_path / "there.backup").write_text("")
    for target, says in (("nowhere/x.backup", "does not exist"), ("there.backup", "already exists")):
        assert main(["--config", str(cfg), "backup", str(tmp_path / target)]) == 4, target
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    new = tmp_path / "new" / "config.toml"
    assert main(["--config", str(new), "restore", str(tmp_path / "missing.backup")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.backup does not exist" in err, err
    assert not new.exists()


def test_init_against_a_server_that_cannot_be_reached_exits_5(tmp_path, capsys, state, monkeypatch):
    """It exited 3 (a configuration error) where every other command exits 5 for an unreachable
    server, as the README's table says; and it wrote nothing."""
    for name, url in (
        ("API", "http://127.0.0.1:9"),
        ("UPSTREAM", "http://127.0.0.1:9"),
        ("DOWNSTREAM", "http://127.0.0.1:9"),
    ):
        monkeypatch.setenv(f"PRIVICORE_{name}_URL", url)
    monkeypatch.setenv("PRIVICORE_WS_URL", "ws://127.0.0.1:9")
    monkeypatch.setenv("PRIVICORE_USERNAME", "u@example.com")
    monkeypatch.setenv("PRIVICORE_PASSWORD", "correct-horse-battery")
    cfg = tmp_path / "cfg" / "config.toml"
    assert main(["--config", str(cfg), "init"]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the Privicore server" in err and "PRIVICORE_API_URL" in err, err
    assert not cfg.exists() and not (cfg.parent / "aes.key").exists()


def test_status_of_a_daemon_that_answers_with_an_error_says_so_not_that_it_hangs(monkeypatch, capsys):
    """A daemon whose status request failed (its staging directory removed) answers with an
    error; 'privifs status' took that for no answer: "not answering … busy or hung", kill -9."""
    import argparse

    import privifs.fs.registry as registry
    from privifs.cli import status_cmd

    entry = {"pid": os.getpid(), "mountpoint": "/nowhere/mnt", "control": "/nowhere/control.sock"}
    monkeypatch.setattr(registry, "registered_mounts", lambda: [entry])
    monkeypatch.setattr(registry, "control_request", lambda e, request, timeout=None: iter([{"error": "it broke"}]))
    code = status_cmd.run_status(argparse.Namespace(mountpoint=None, json=False))
    out = capsys.readouterr().out
    assert code == 1 and "could not tell its status: it broke" in out, out
    assert "not answering" not in out and "kill -9" not in out


def unreachable_server_config(tmp_path: Path) -> Path:
    """A configuration whose server cannot be reached (nothing listens on port 9), with its key
    and password files."""
    key, password = tmp_path / "aes.key", tmp_path / "password"
    key.write_text(os.urandom(32).hex() + "\n")
    password.write_text("pw\n")
    key.chmod(0o600)
    password.chmod(0o600)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[server]\nembedded = false\napi = "http://127.0.0.1:9"\n[account]\nusername = "u"\n'
        f'password_file = "{password}"\n[keys]\naes_key_file = "{key}"\n'
    )
    return cfg


def test_a_configuration_another_user_owns_or_under_a_directory_all_may_write_is_refused(
    tmp_path, capsys, state, monkeypatch
):
    """Only the mode of the configuration and of its directory was looked at (helper hW): a
    configuration directory another user owns, or one under a directory every user may write
    (where that user can put a directory of their own in its place), was used without a word."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    shared = tmp_path / "shared"
    cfg_dir = shared / "privifs"
    cfg_dir.mkdir(parents=True, mode=0o700)
    cfg = cfg_dir / "config.toml"
    cfg.write_text('[server]\nembedded = false\napi = "http://127.0.0.1:9"\n')
    cfg.chmod(0o600)

    def refusal() -> str:
        code = main(["--config", str(cfg), "token", "ls"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err if code == 3 else ""

    assert "belongs to another user" not in refusal() and "writable by every user" not in refusal()
    shared.chmod(0o777)
    assert f"{shared} is writable by every user" in refusal()
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot replace what is in it
    assert "writable by every user" not in refusal()
    shared.chmod(0o755)
    for target in (cfg_dir, cfg):
        os.chown(target, 65534, 65534)
        assert f"{target} belongs to another user (uid 65534)" in refusal()
        main(["--config", str(cfg), "status"])  # reads no configuration: not refused (helper hZ N3)
        assert "belongs to another user" not in capsys.readouterr().err
        os.chown(target, 0, 0)


def test_root_setting_up_privifs_in_a_home_another_user_owns_is_refused_and_makes_nothing_there(
    tmp_path, capsys, monkeypatch
):
    """Root running ``privifs init`` (or a first ``mount``) with a user's HOME, before that user
    set privifs up (``sudo -E``): the check of who owns the configuration looked only at places
    that existed, so root made a vault of its own there, ``~/.config`` and the rest root's, and
    every later command of the user failed with "Permission denied" (helper hAO F2)."""
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, 65534)
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "PRIVIFS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    for argv in (["init"], ["mount", str(tmp_path / "mnt")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 3 and f"{home} belongs to another user (uid 65534)" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert list(home.iterdir()) == [], "something was made in the other user's home"
    own = tmp_path / "own"  # and root's own home, where nothing exists yet, is not refused
    own.mkdir()
    from privifs.paths import shared_with_others

    assert shared_with_others(own / ".config" / "privifs" / "config.toml") is None


def test_directories_privifs_makes_are_private_whatever_the_umask(tmp_path):
    """Under umask 000, ``~/.config`` and ``~/.local/state/privifs`` were made 0777 on the way
    to the 0700 directory asked for (helper hW)."""
    from privifs.paths import private_dir

    old = os.umask(0)
    try:
        leaf = private_dir(tmp_path / "home" / ".config" / "privifs")
        assert private_dir(leaf) == leaf  # there already: fine
    finally:
        os.umask(old)
    for d in (tmp_path / "home", tmp_path / "home" / ".config", leaf):
        assert (d.stat().st_mode & 0o777) == 0o700, d
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        private_dir(tmp_path / "file")


def test_two_first_inits_at_once_make_one_vault(tmp_path):
    """Two set-ups at once on a new home (two first mounts at a first boot, an init beside a
    mount) each found no profile in the embedded engine and registered their own: both drives
    mounted, on two vaults, and the configuration named one (helper hW: 4 of 30 rounds). One
    set-up at a time: the second finds the configuration the first made."""
    import subprocess
    import sys

    from privifs.account import embedded_profiles
    from tests.mountkit import isolated_env

    env = isolated_env(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "privifs", "init"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 3], results
    assert any("already exists" in err for code, err in results if code == 3), results
    assert len(embedded_profiles(tmp_path / "data" / "privifs" / "engine")) == 1


def test_a_first_mount_over_a_directory_that_is_not_empty_makes_no_vault(tmp_path):
    """Refused for its mountpoint, a first mount had set up a vault first (helper hZ N4)."""
    from tests.mountkit import isolated_env, privifs

    env = isolated_env(tmp_path)
    mnt = tmp_path / "photos"
    mnt.mkdir()
    (mnt / "holiday.jpg").write_bytes(b"jpeg")
    r = privifs(env, "mount", str(mnt), check=False)
    assert r.returncode == 4 and "is not empty" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "config" / "privifs" / "config.toml").exists()
    assert not (tmp_path / "data" / "privifs" / "engine").exists()


@pytest.mark.parametrize("no_link", [errno.EPERM, errno.EOPNOTSUPP])
def test_secret_files_are_written_on_a_file_system_without_hard_links(tmp_path, monkeypatch, no_link):
    """init published each secret with link(2), which a file system without hard links (vfat,
    exFAT, a privifs mount) refuses: init failed with "Operation not permitted" (helper hAD F6).
    The file is then created in place: 0600, whole, nothing left beside it, never overwritten."""
    from privifs.crypto.keys import generate_aes_key_file, load_aes_key, write_secret_file

    def no_hard_links(src, dst, **kw):
        raise OSError(no_link, os.strerror(no_link))

    monkeypatch.setattr(os, "link", no_hard_links)
    key = generate_aes_key_file(tmp_path / "conf" / "aes.key")
    assert load_aes_key(tmp_path / "conf" / "aes.key") == key
    assert (tmp_path / "conf" / "aes.key").stat().st_mode & 0o777 == 0o600
    write_secret_file(tmp_path / "conf" / "password", b"secret\n")
    with pytest.raises(FileExistsError):
        write_secret_file(tmp_path / "conf" / "password", b"other\n")
    assert (tmp_path / "conf" / "password").read_bytes() == b"secret\n"
    assert sorted(p.name for p in (tmp_path / "conf").iterdir()) == ["aes.key", "password"]


def test_a_live_mount_of_another_user_is_named_with_what_its_owner_or_root_can_do(monkeypatch):
    """'privifs umount' of another user's live mount said 'fusermount3 -u DIR' unmounts it
    anyway, which works only for the user who mounted it (helper hAD F7)."""
    from privifs.cli import status_cmd

    monkeypatch.setattr(status_cmd, "mount_options", lambda mp: {"rw", f"user_id={os.getuid() + 4242}"})
    err = str(status_cmd._foreign(Path("/media/their drive"), "umount"))
    assert f"daemon another user (uid {os.getuid() + 4242}) started: that user runs 'privifs umount " in err
    assert "'/media/their drive'', or root 'umount '/media/their drive'' to unmount it anyway" in err
    assert "fusermount3" not in err
    err = str(status_cmd._foreign(Path("/media/their drive"), "status"))
    assert err.endswith("that user runs 'privifs status '/media/their drive''"), err


def test_status_prints_another_applications_names_in_its_errors_escaped(capsys):
    """'fetch failed' and 'last error' lines printed a token name with an escape sequence raw
    (helper hAH F7): every line of status is escaped now."""
    from privifs.cli.status_cmd import print_status

    print_status({"mountpoint": "/m", "error": "fetch failed: /esc/bad\x1b]0;TITLE\x07\x1b[32mgreen.txt"})
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert out == "/m: fetch failed: /esc/bad\\x1b]0;TITLE\\x07\\x1b[32mgreen.txt\n"
