"""``privifs init`` and ``privifs token …`` as a user runs them: subprocesses with their own XDG
directories, against a real engine (and the embedded engine)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
import trio

from privifs.client.connect import connect
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from tests.mountkit import isolated_env
from tests.mountkit import privifs as run


def test_init_writes_private_config_and_keys_and_no_secret_in_it(user, tmp_path):
    cfg_dir = tmp_path / "config" / "privifs"
    for name in ("config.toml", "aes.key", "password", "identity.key"):
        assert stat.S_IMODE((cfg_dir / name).stat().st_mode) == 0o600, name
    key = (cfg_dir / "aes.key").read_text().strip()
    assert len(key) == 64 and int(key, 16) >= 0
    text = (cfg_dir / "config.toml").read_text()
    assert "correct-horse-battery" not in text and key not in text
    again = run(user, "init", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_a_password_file_others_can_read_is_refused_in_one_line(user, tmp_path):
    password = tmp_path / "config" / "privifs" / "password"
    password.chmod(0o644)
    r = run(user, "token", "ls", check=False)
    assert r.returncode == 3 and "accessible by other users" in r.stderr and "chmod 600" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    password.chmod(0o600)
    assert run(user, "token", "ls").returncode == 0


def test_put_ls_stat_get_mv_rm(user, tmp_path):
    src = tmp_path / "report.pdf"
    data = os.urandom(3 * 1024 * 1024 + 7)
    src.write_bytes(data)
    token = run(user, "token", "put", str(src), "--context", "/docs").stdout.strip()
    assert token.startswith("dtk-")
    listing = run(user, "token", "ls").stdout
    assert token in listing and "/docs/report.pdf" in listing
    rows = [json.loads(line) for line in run(user, "token", "ls", "--json").stdout.splitlines()]
    assert rows[0]["token"] == token and rows[0]["size"] == len(data) and rows[0]["extension"] == "pdf"
    out = tmp_path / "out.pdf"
    run(user, "token", "get", token, str(out))
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    run(user, "token", "mv", token, "--name", "final.pdf", "--context", "/archive")
    st = json.loads(run(user, "token", "stat", token).stdout)
    assert (st["fileName"], st["context"]) == ("final.pdf", "/archive")
    # it states its content's digest (the 'token get' above checked it, as a mount's read does)
    assert len(json.dumps(st).split('"privifs.digest": "')[1].split('"')[0]) == 64
    run(user, "token", "rm", token)
    gone = run(user, "token", "stat", token, check=False)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and "does not exist" in gone.stderr


def test_failures_exit_non_zero_with_one_clear_line(user, tmp_path, eng):
    missing = run(user, "token", "put", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 4 and "cannot read" in missing.stderr and missing.stderr.count("\n") == 1
    unknown = run(user, "token", "get", "dtk-unknown", str(tmp_path / "x"), check=False)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
    assert not (tmp_path / "x").exists()
    (tmp_path / "config" / "privifs" / "password").write_text("wrong-password-here")
    wrong = run(user, "token", "ls", check=False)
    assert wrong.returncode == 1 and "refused" in wrong.stderr and wrong.stderr.count("\n") == 1
    assert "Traceback" not in wrong.stderr
    down = dict(user, PRIVICORE_API_URL="http://127.0.0.1:9")
    cfg = tmp_path / "other.toml"
    run(down, "--config", str(cfg), "init", "--key-file", str(tmp_path / "config" / "privifs" / "aes.key"), check=False)
    assert not cfg.exists()


def test_a_big_put_whose_manifest_risk_meta_fails_leaves_no_manifest(user, tmp_path, eng):
    """The manifest token is made before its risk meta marks it; when that fails, put exits 1
    and the token it made is deleted (it stayed, unmarked, at the file's name)."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(9 * 1024 * 1024 + 5))
    eng.set_options(reject="configure-information-security-risk-meta")
    try:
        failed = run(user, "token", "put", str(src), "--context", "/docs", check=False)
    finally:
        eng.set_options(reject="")
    assert failed.returncode == 1 and "rejected" in failed.stderr, failed.stderr
    rows = [json.loads(line) for line in run(user, "token", "ls", "--json").stdout.splitlines()]
    assert [r["token"] for r in rows if r["context"] == "/docs"] == []


def test_tampered_token_is_refused_by_get_and_leaves_no_file(user, tmp_path, eng):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3_000_000))  # several blocks reach the partial file before the tag fails
    token = run(user, "token", "put", str(src)).stdout.strip()
    blobs = [f for d in (eng.data_dir / "blobs").iterdir() for f in d.iterdir()]
    blob = max(blobs, key=lambda f: f.stat().st_mtime_ns)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out.bin"
    r = run(user, "token", "get", token, str(out), check=False)
    assert r.returncode == 6 and "authentication" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.bin*"))


def test_a_get_killed_midway_leaves_no_plaintext_file_behind(user, tmp_path, eng):
    """A get killed with SIGKILL (or by the OOM killer, or a power cut) left
    .OUT.privifs-partial beside the output for good: the plaintext it had written so far, a
    file the user never asked for. The unfinished file has no name now (O_TMPFILE)."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(7_000_000))  # one token, sent by the engine in 4 MiB pieces
    token = run(user, "token", "put", str(src)).stdout.strip()
    dest = tmp_path / "dest"
    dest.mkdir()
    eng.set_options(stream_bytes_per_second=1_000_000)  # the first piece comes after 4 s, the rest 3 s later
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "privifs", "token", "get", token, str(dest / "out.bin")],
            env=user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not any(str(dest) in target for target in _open_files(proc.pid)):
                assert proc.poll() is None and time.monotonic() < deadline, "the get never opened its output"
                time.sleep(0.05)
            time.sleep(0.2)  # some blocks written
        finally:
            proc.kill()
            proc.wait(timeout=30)
    finally:
        eng.set_options(stream_bytes_per_second=0)
    assert list(dest.iterdir()) == []
    run(user, "token", "get", token, str(dest / "out.bin"))  # and the next get works
    assert [f.name for f in dest.iterdir()] == ["out.bin"] and (dest / "out.bin").read_bytes() == src.read_bytes()


def _open_files(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def test_get_never_replaces_a_device_fifo_or_socket_nor_writes_into_a_planted_partial_file(user, tmp_path):
    """'privifs token get TOKEN /dev/full' (as root) renamed the plaintext over the device node:
    /dev/full became a regular file holding the decrypted content; a FIFO or socket was replaced
    the same way. And the partial file was opened without O_EXCL: a file another user had put at
    .OUT.privifs-partial (in a shared directory) received the plaintext, a symlink there led the
    write to its target."""
    src = tmp_path / "secret.txt"
    src.write_bytes(b"plaintext " * 1000)
    token = run(user, "token", "put", str(src)).stdout.strip()

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = run(user, "token", "get", token, str(fifo), check=False)
    assert r.returncode == 4 and "not a regular file" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not list(tmp_path.glob(".fifo*"))

    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    planted = tmp_path / ".out.txt.privifs-partial"
    planted.symlink_to(victim)
    out = tmp_path / "out.txt"
    run(user, "token", "get", token, str(out))
    assert victim.read_bytes() == b"do not touch"
    assert out.read_bytes() == src.read_bytes() and not out.is_symlink()
    assert not planted.exists() and not planted.is_symlink()

    planted.write_bytes(b"")  # a file someone else could read along
    planted.chmod(0o666)
    watcher = open(planted, "rb")  # the other user's open descriptor
    try:
        run(user, "token", "get", token, str(out))
        assert watcher.read() == b"", "the plaintext went into the planted file"
    finally:
        watcher.close()
    assert out.read_bytes() == src.read_bytes()


def test_get_never_overwrites_privifs_own_secrets_and_keeps_a_replaced_files_mode(user, tmp_path):
    """'privifs token get TOKEN ~/.config/privifs/password' replaced the password (mode 0600) with
    the token's plaintext, mode 0644: a mistyped output path destroyed a secret. And a private
    file (0600) that 'get' replaced became 0644: its new plaintext readable by every user."""
    src = tmp_path / "notes.txt"
    src.write_bytes(b"plaintext " * 100)
    token = run(user, "token", "put", str(src)).stdout.strip()
    cfg_dir = tmp_path / "config" / "privifs"
    for name in ("password", "aes.key", "identity.key", "config.toml"):
        before = (cfg_dir / name).read_bytes()
        r = run(user, "token", "get", token, str(cfg_dir / name), check=False)
        assert r.returncode == 4 and "never overwrites" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert (cfg_dir / name).read_bytes() == before
        assert stat.S_IMODE((cfg_dir / name).stat().st_mode) == 0o600
    # a secret this account has not made (OAuth tokens) is not written either: the file, 0644
    # beside the configuration, was then taken for that secret (helper hW)
    assert not (cfg_dir / "oauth.json").exists()
    r = run(user, "token", "get", token, str(cfg_dir / "oauth.json"), check=False)
    assert r.returncode == 4 and "never overwrites" in r.stderr, r.stderr
    assert not (cfg_dir / "oauth.json").exists()
    assert run(user, "token", "ls").returncode == 0  # the account still works
    private = tmp_path / "private.txt"
    private.write_bytes(b"old")
    private.chmod(0o600)
    run(user, "token", "get", token, str(private))
    assert private.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    fresh = tmp_path / "fresh.txt"
    run(user, "token", "get", token, str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_wrong_key_file_is_detected(user, tmp_path):
    key = tmp_path / "config" / "privifs" / "aes.key"
    key.write_text(os.urandom(32).hex() + "\n")
    r = run(user, "token", "ls", check=False)
    assert r.returncode == 3 and "not the key this configuration was created with" in r.stderr
    key.chmod(0o644)
    r = run(user, "token", "ls", check=False)
    assert r.returncode == 3 and "chmod 600" in r.stderr


def test_init_with_no_server_provisions_on_the_embedded_engine(tmp_path):
    env = isolated_env(tmp_path)
    out = run(env, "init").stdout
    assert "embedded engine" in out and "Keep a copy of the AES key" in out
    src = tmp_path / "hello.txt"
    src.write_text("hello embedded")
    token = run(env, "token", "put", str(src)).stdout.strip()
    run(env, "token", "get", token, str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "hello embedded"
    # the engine started for each command has stopped again
    assert not (tmp_path / "data" / "privifs" / "engine" / "urls.json").exists()


KILLED_FIRST_INIT = """
import os, time, httpx
from privifs import paths
from privifs.account import embedded_usernames
from privifs.embedded import EmbeddedEngine
d = paths.private_dir(paths.config_dir())
for name, data in (("password", "pw-of-a-killed-init"), ("aes.key", os.urandom(32).hex() + "\\n")):
    fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data.encode())
    os.close(fd)
engine = EmbeddedEngine()
urls = engine.ensure(watch=False)
form = {"username": "killed@localhost", "password": "pw-of-a-killed-init"}
assert httpx.post(urls["api"] + "/profile/register-profile", data=form).status_code in (200, 202)
deadline = time.monotonic() + 30
while "killed@localhost" not in embedded_usernames():
    assert time.monotonic() < deadline
    time.sleep(0.1)
engine.stop()
"""


def test_init_after_a_first_init_killed_before_it_registered_the_public_key(tmp_path):
    """A first 'privifs mount' (or init) on the embedded engine killed between registering the
    profile and its public key (seen by a kill -9 loop): every later mount failed with 'forbidden
    (profile.public_key_missing)', and nothing but deleting the engine's data got out of it. The
    profile it finds without a key is finished (with the password the killed run kept)."""
    env = isolated_env(tmp_path)
    subprocess.run([sys.executable, "-c", KILLED_FIRST_INIT], env=env, check=True, timeout=120)
    out = run(env, "init").stdout
    assert "killed@localhost" in out
    src = tmp_path / "hello.txt"
    src.write_text("after the killed init")
    token = run(env, "token", "put", str(src)).stdout.strip()
    run(env, "token", "get", token, str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "after the killed init"


def closed_pipe_run(env: dict, *args: str) -> subprocess.CompletedProcess:
    """Run privifs with stdout a pipe nobody reads any more (like '| head -1' once head exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            [sys.executable, "-m", "privifs", *args], env=env, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(w)


def tokens_with_key(env: dict) -> list[dict]:
    return [json.loads(line) for line in run(env, "token", "ls", "--json", "--all").stdout.splitlines()]


def test_init_refuses_a_key_file_that_does_not_decrypt_the_vault(user, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("written with the right key")
    run(user, "token", "put", str(src))
    other_key = tmp_path / "other.key"
    other_key.write_text(os.urandom(32).hex() + "\n")
    other_key.chmod(0o600)
    other = tmp_path / "other"
    env = isolated_env(other, **{k: v for k, v in user.items() if k.startswith("PRIVICORE_")})
    r = run(env, "init", "--key-file", str(other_key), check=False)
    assert r.returncode == 3 and "does not decrypt this vault" in r.stderr and r.stderr.count("\n") == 1
    assert not (other / "config" / "privifs" / "config.toml").exists()
    assert not (other / "config" / "privifs" / "aes.key").exists()
    # init without --key-file on an existing account makes a new key: refused the same way
    r = run(env, "init", check=False)
    assert r.returncode == 3 and "does not decrypt this vault" in r.stderr
    assert not (other / "config" / "privifs" / "config.toml").exists()


def test_every_token_command_refuses_a_wrong_key_before_writing(user, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("right key")
    token = run(user, "token", "put", str(src)).stdout.strip()
    before = tokens_with_key(user)
    cfg_dir = tmp_path / "config" / "privifs"
    right = (cfg_dir / "aes.key").read_text()
    # a wrong key put in place behind privifs' back, the fingerprint in the config removed too
    (cfg_dir / "aes.key").unlink()
    (cfg_dir / "aes.key").write_text(os.urandom(32).hex() + "\n")
    (cfg_dir / "aes.key").chmod(0o600)
    cfg = cfg_dir / "config.toml"
    cfg.write_text("".join(line for line in cfg.read_text().splitlines(True) if not line.startswith("key_id")))
    for args in (
        ("put", str(src)),
        ("ls",),
        ("get", token, str(tmp_path / "out")),
        ("stat", token),
        ("mv", token, "--name", "b.txt"),
        ("rm", token),
    ):
        r = run(user, "token", *args, check=False)
        assert r.returncode == 3 and "does not decrypt this vault" in r.stderr, args
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    (cfg_dir / "aes.key").unlink()
    (cfg_dir / "aes.key").write_text(right)
    (cfg_dir / "aes.key").chmod(0o600)
    assert tokens_with_key(user) == before


def test_a_failed_init_leaves_no_new_secret_that_blocks_the_next_one(user, tmp_path):
    """'privifs init' with a mistyped password failed but left the AES key it had just made;
    the right 'init --key-file KEY' then failed with 'aes.key already holds another AES key
    ... move it away'. A --register of a taken name left its new password, identity and key."""
    other = tmp_path / "other"
    cfg_dir = other / "config" / "privifs"
    env = isolated_env(other, **{k: v for k, v in user.items() if k.startswith("PRIVICORE_")})
    r = run(dict(env, PRIVICORE_PASSWORD="a-typo"), "init", check=False)
    assert r.returncode == 1 and "refused username" in r.stderr, r.stderr
    assert not (cfg_dir / "aes.key").exists()
    r = run(dict(env, PRIVICORE_PASSWORD="another-password"), "init", "--register", check=False)
    assert r.returncode != 0 and "already taken" in r.stderr, r.stderr
    assert sorted(p.name for p in cfg_dir.iterdir()) == []
    run(env, "init", "--key-file", str(tmp_path / "config" / "privifs" / "aes.key"))
    run(env, "token", "ls")


def test_a_name_that_is_not_utf8_is_refused_in_one_line(user, tmp_path):
    """'token put F --name $'\\xff'' (or a file whose own name is not UTF-8) uploaded the
    content, then ended in 'internal error: UnicodeEncodeError' with a logging traceback."""
    src = tmp_path / "a.txt"
    src.write_text("x")
    for args in (("put", str(src), "--name", "\udcff"), ("put", str(src), "--context", "/\udcff")):
        r = run(user, "token", *args, check=False)
        assert r.returncode == 2 and "not valid UTF-8" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    odd = tmp_path / "\udcff.txt"
    odd.write_text("x")
    r = run(user, "token", "put", str(odd), check=False)
    assert r.returncode == 4 and "--name" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    token = run(user, "token", "put", str(odd), "--name", "fine.txt").stdout.strip()
    r = run(user, "token", "mv", token, "--name", "\udcff", check=False)
    assert r.returncode == 2 and "not valid UTF-8" in r.stderr, r.stderr
    assert "internal error" not in r.stderr
    for args in (("get", "dtk-\udcff", str(tmp_path / "out")), ("rm", "\udcff"), ("stat", "\udcff")):
        r = run(user, "token", *args, check=False)
        assert r.returncode == 2 and "not valid UTF-8" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_home_moved_or_copied_elsewhere_uses_its_own_secrets(user, tmp_path):
    """The configuration named its secrets by their full paths under the home it was made in: a
    home moved elsewhere (``usermod -m``, another machine) failed with "AES key file … does not
    exist", and a copy used the old home's key and password while that home was there (helper
    hAO F7). Secrets beside the configuration are named relative to it now."""
    cfg_dir = tmp_path / "config" / "privifs"
    text = (cfg_dir / "config.toml").read_text()
    assert 'aes_key_file = "aes.key"' in text and 'password_file = "password"' in text, text
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(tmp_path / "config", moved / "config")  # a copy, the old home still there
    (cfg_dir / "aes.key").write_text(os.urandom(32).hex() + "\n")  # the old home's key changes
    env = isolated_env(moved, **{k: v for k, v in user.items() if k.startswith("PRIVICORE_")})
    assert run(env, "token", "ls").returncode == 0  # its own key: the vault's
    assert "not the key" in run(user, "token", "ls", check=False).stderr  # (the old one reads the new)
    shutil.rmtree(cfg_dir)  # and moved: the old home gone
    assert run(env, "token", "ls").returncode == 0


def test_init_copies_the_key_file_so_removing_it_breaks_nothing(user, tmp_path):
    key = tmp_path / "usb" / "vault.key"
    key.parent.mkdir()
    shutil.copy2(tmp_path / "config" / "privifs" / "aes.key", key)
    other = tmp_path / "other"
    env = isolated_env(other, **{k: v for k, v in user.items() if k.startswith("PRIVICORE_")})
    run(env, "init", "--key-file", str(key))
    copied = other / "config" / "privifs" / "aes.key"
    assert copied.read_text() == key.read_text() and stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert 'aes_key_file = "aes.key"' in (other / "config" / "privifs" / "config.toml").read_text()  # beside it
    shutil.rmtree(key.parent)  # the USB stick is gone
    run(env, "token", "ls")
    copied.unlink()
    r = run(env, "token", "ls", check=False)
    assert r.returncode == 3 and "aes_key_file" in r.stderr and "point key_file" not in r.stderr


def test_init_never_overwrites_an_existing_key_or_password(user, tmp_path):
    cfg_dir = tmp_path / "config" / "privifs"
    key, password = (cfg_dir / "aes.key").read_bytes(), (cfg_dir / "password").read_bytes()
    other_key = tmp_path / "other.key"
    other_key.write_text(os.urandom(32).hex() + "\n")
    other_key.chmod(0o600)
    r = run(user, "init", "--force", "--key-file", str(other_key), check=False)
    assert r.returncode == 3 and "never overwrites" in r.stderr
    r = run(dict(user, PRIVICORE_PASSWORD="another-password"), "init", "--force", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert (cfg_dir / "aes.key").read_bytes() == key and (cfg_dir / "password").read_bytes() == password
    run(user, "init", "--force")  # the same key and password: reused
    assert (cfg_dir / "aes.key").read_bytes() == key and (cfg_dir / "password").read_bytes() == password


def test_init_force_without_the_server_settings_keeps_the_server_the_configuration_names(user, tmp_path):
    """``init --force`` run to repair a configuration, without the PRIVICORE_* settings, made a
    new vault on the embedded engine: the next mount showed an empty drive (helper hAM F3)."""
    cfg = tmp_path / "config" / "privifs" / "config.toml"
    note = tmp_path / "note.txt"
    note.write_text("on the server")
    token = run(user, "token", "put", str(note)).stdout.strip()
    bare = {k: v for k, v in user.items() if not k.startswith("PRIVICORE_")}
    r = run(bare, "init", "--force")
    assert "keeping the server" in r.stdout and user["PRIVICORE_API_URL"] in cfg.read_text()
    assert "embedded = false" in cfg.read_text() and user["PRIVICORE_USERNAME"] in cfg.read_text()
    assert token in run(bare, "token", "ls").stdout
    cfg.write_text(cfg.read_text() + "garbage [\n")  # damaged: which server it meant is not known
    r = run(bare, "init", "--force", check=False)
    assert r.returncode == 3 and "separate server" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert cfg.read_text().endswith("garbage [\n")
    run(user, "init", "--force")  # given the server again: repaired
    assert token in run(bare, "token", "ls").stdout


def test_user_mistakes_get_one_line_and_a_distinct_exit_code(user, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    r = run(user, "token", "put", str(folder), check=False)
    assert r.returncode == 4 and "is a directory" in r.stderr and r.stderr.count("\n") == 1
    (folder / "a.txt").write_text("into a directory")
    token = run(user, "token", "put", str(folder / "a.txt")).stdout.strip()
    out_dir = tmp_path / "downloads"
    out_dir.mkdir()
    run(user, "token", "get", token, str(out_dir))  # like cp: into the directory, under its name
    assert (out_dir / "a.txt").read_text() == "into a directory"
    r = run(user, "token", "get", token, str(tmp_path / "missing" / "dir" / "out"), check=False)
    assert r.returncode == 4 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "missing").exists()
    r = run(user, "token", "put", str(folder / "a.txt"), "--bogus", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--bogus" in r.stderr


def test_a_closed_output_pipe_ends_quietly(user, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("x")
    for _ in range(3):
        run(user, "token", "put", str(src))
    r = closed_pipe_run(user, "token", "ls")
    assert r.returncode == 141 and r.stderr == ""


def test_get_onto_a_full_disk_names_the_file_and_what_to_do(user, tmp_path):
    """A 'token get' whose output disk filled up said only 'No space left on device'."""
    from tests.test_fs_fulldisk import small_filesystem

    src = tmp_path / "big.bin"
    data = os.urandom(2 * 1024 * 1024)
    src.write_bytes(data)
    token = run(user, "token", "put", str(src)).stdout.strip()
    with small_filesystem(tmp_path / "small", "512k") as small:
        for out in (small / "got.bin", small):  # a file named, and a directory (the token's own name)
            r = run(user, "token", "get", token, str(out), check=False)
            assert r.returncode == 4 and r.stderr.count("\n") == 1, r.stderr
            named = small / "got.bin" if out != small else small / "big.bin"
            assert f"cannot write the file {named}: No space left on device" in r.stderr, r.stderr
            assert "free some space there" in r.stderr and "Traceback" not in r.stderr
            assert list(small.iterdir()) == []  # no partial file left
        subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True, timeout=30)
        run(user, "token", "get", token, str(small / "got.bin"))
        assert (small / "got.bin").read_bytes() == data


@pytest.mark.slow
def test_get_into_a_directory_writes_only_inside_it_whatever_the_token_is_named(user, tmp_path, eng):
    """A token's fileName is what any client of the vault (or the server) says: 'token get TOKEN
    DIR' wrote a token named '../x' beside DIR and one named '/abs/x' at that absolute path.
    ('token put --name' refuses such names; another application named these.)"""
    src = tmp_path / "payload"
    src.write_bytes(b"not yours to place")
    outside = tmp_path / "outside.txt"
    into = tmp_path / "into" / "dir"
    into.mkdir(parents=True)
    expected = {
        "../outside.txt": "..\u2215outside.txt",
        str(outside): str(outside).replace("/", "\u2215"),
        "..": "unnamed..",
        ".": "unnamed.",
    }
    tokens = {name: run(user, "token", "put", str(src), "--context", "/evil").stdout.strip() for name in expected}

    async def rename() -> None:
        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], "correct-horse-battery")
        async with connect(Endpoints.from_dict(eng.urls), credentials) as client:
            for name, token in tokens.items():
                await client.tokens.update(token, file_name=name)

    trio.run(rename)
    for name, shown in expected.items():
        r = run(user, "token", "get", tokens[name], str(into), check=False)
        assert r.returncode == 0, (name, r.stderr)
        assert (into / shown).read_bytes() == src.read_bytes(), name
    assert not outside.exists() and not (tmp_path / "into" / "outside.txt").exists()
    assert sorted(p.name for p in into.iterdir()) == sorted(expected.values())


@pytest.mark.slow
def test_get_of_a_symlink_token_makes_the_link_and_of_a_fifo_or_directory_writes_nothing(user, tmp_path, eng):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    risk = {
        "link": {"privifs.type": "symlink", "privifs.target": "../some where/target.txt"},
        "pipe": {"privifs.type": "fifo", "privifs.mode": "644"},
        "dir": {"privifs.type": "dir", "privifs.mode": "755"},
    }
    tokens = {name: run(user, "token", "put", str(empty), "--name", name).stdout.strip() for name in risk}

    async def mark() -> None:
        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], "correct-horse-battery")
        async with connect(Endpoints.from_dict(eng.urls), credentials) as client:
            for name, fields in risk.items():
                await client.tokens.set_risk(tokens[name], fields)

    trio.run(mark)
    out = tmp_path / "out"
    out.mkdir()
    run(user, "token", "get", tokens["link"], str(out))
    assert os.readlink(out / "link") == "../some where/target.txt"
    run(user, "token", "get", tokens["link"], str(out / "again"))  # and in place of a file named
    assert os.readlink(out / "again") == "../some where/target.txt"
    for name, what in (("pipe", "FIFO"), ("dir", "directory")):
        r = run(user, "token", "get", tokens[name], str(out), check=False)
        assert r.returncode == 1 and f"is a {what}" in r.stderr and "nothing was written" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["again", "link"]


def _rename_as_another_application(env: dict, token: str, **fields: str) -> None:
    """update-data-token sent the way another Privicore application sends it (plain HTTP, as the
    reference's section 5 describes), so the token's fields are exactly these."""
    import time

    import httpx

    api = env["PRIVICORE_API_URL"]
    with httpx.Client(timeout=30) as http:
        auth = http.post(
            api + "/profile/authenticate",
            data={"username": env["PRIVICORE_USERNAME"], "password": env["PRIVICORE_PASSWORD"]},
        )
        headers = {"X-DPT-AUTHORIZATION": auth.json()["authorizationToken"]}
        r = http.post(api + "/data-token/update-data-token", data={"token": token, **fields}, headers=headers)
        assert r.status_code == 202, r.text
        command = r.json()["commandId"]
        deadline = time.monotonic() + 30
        while (status := http.post(api + f"/request-status/{command}", json={}, headers=headers).json()) == "started":
            assert time.monotonic() < deadline, "the rename was not applied in 30 s"
            time.sleep(0.05)
        assert status == "succeeded", status


@pytest.mark.slow
def test_get_into_a_directory_writes_the_name_the_mount_shows_however_long(user, tmp_path):
    """'token get TOKEN DIR' of a file named with 239 to 255 bytes (names the mount makes and
    shows) failed with "File name too long": the partial file beside it, '.NAME.privifs-partial',
    was longer than a name can be. And a token of another application named 'README' with
    extension 'md', which the mount shows as README.md, was written as 'README'."""
    src = tmp_path / "payload"
    src.write_bytes(b"long names are names")
    into = tmp_path / "into"
    into.mkdir()
    for name in ("n" * 251 + ".txt", "é" * 125 + ".md", "x" * 255):
        token = run(user, "token", "put", str(src), "--name", name).stdout.strip()
        r = run(user, "token", "get", token, str(into), check=False)
        assert r.returncode == 0, (name, r.stderr)
        assert (into / name).read_bytes() == src.read_bytes()
        run(user, "token", "get", token, str(into))  # again, over the file it wrote
    token = run(user, "token", "put", str(src), "--name", "README").stdout.strip()
    _rename_as_another_application(user, token, fileName="README", extension="md")
    run(user, "token", "get", token, str(into))
    assert (into / "README.md").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in into.iterdir()) == sorted(
        ["n" * 251 + ".txt", "é" * 125 + ".md", "x" * 255, "README.md"]
    )


def test_get_of_a_symlink_token_named_with_up_to_255_bytes_makes_the_link(user, tmp_path, eng):
    """A symbolic link the mount made with a name of 241 to 255 bytes: 'token get' wrote the
    link beside its output first as '.NAME.privifs-<12 hex>', too long a name, and failed with
    'File name too long'."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    names = ["l" * 255, "é" * 127]
    tokens = [run(user, "token", "put", str(empty), "--name", name).stdout.strip() for name in names]

    async def mark() -> None:
        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], "correct-horse-battery")
        async with connect(Endpoints.from_dict(eng.urls), credentials) as client:
            for token in tokens:
                await client.tokens.set_risk(token, {"privifs.type": "symlink", "privifs.target": "target"})

    trio.run(mark)
    out = tmp_path / "out"
    out.mkdir()
    for name, token in zip(names, tokens, strict=True):
        r = run(user, "token", "get", token, str(out), check=False)
        assert r.returncode == 0, (name, r.stderr)
        assert os.readlink(out / name) == "target"
        run(user, "token", "get", token, str(out))  # again, over the link it made
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


@pytest.mark.slow
def test_put_and_mv_refuse_a_context_the_mount_cannot_show_as_given(user, tmp_path):
    """'token put F --context ../..' stored a token the mount showed under 'unnamed..' and
    'privifs verify' reported as 'not yet in the local index' for ever; '--context /.privifs'
    put a user's file among privifs' own tokens (a second key check; in /.privifs/parts the
    sweep deletes it). Such a context is now a bad command line: one line, exit 2, nothing
    stored."""
    src = tmp_path / "f.txt"
    src.write_text("x")
    for option, value in (
        ("--context", "../.."),
        ("--context", "docs"),
        ("--context", "/a/../b"),
        ("--context", "/.privifs"),
        ("--context", "/.privifs/parts"),
    ):
        r = run(user, "token", "put", str(src), option, value, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and option in r.stderr, (option, value, r.stderr)
    assert run(user, "token", "ls", "--all").stdout.count("f.txt") == 0
    token = run(user, "token", "put", str(src), "--context", "/docs/").stdout.strip()
    r = run(user, "token", "mv", token, "--name", "g.txt", "--context", "../x", check=False)
    assert r.returncode == 2 and "--context" in r.stderr
    run(user, "token", "mv", token, "--name", "g.txt", "--context", "//archive//2024")
    st = json.loads(run(user, "token", "stat", token).stdout)
    assert (st["fileName"], st["context"]) == ("g.txt", "/archive/2024")


def test_mv_and_put_refuse_a_name_a_directory_cannot_hold_and_get_says_why_it_cannot_write(user, tmp_path):
    """'token mv T --name ""' went to the server and exited 1; '--name a/b' was accepted and made
    a listing entry 'dir/a/b' that reads as a path ('token put --name a/b' too). Both are refused
    before anything is sent, as usage errors (2). 'token get T /proc/version' said only 'No such
    file or directory'."""
    src = tmp_path / "a.txt"
    src.write_text("stays named a.txt")
    token = run(user, "token", "put", str(src), "--context", "/docs").stdout.strip()
    for name, says in (("", "empty"), (" ", "empty"), ("a/b", "'/'"), (".", "'.'"), ("..", "'..'")):
        for command in (("mv", token), ("put", str(src))) if name in ("a/b", "..") else (("mv", token),):
            r = run(user, "token", *command, "--name", name, check=False)
            assert r.returncode == 2, (command, name, r.returncode, r.stderr)
            assert r.stderr.count("\n") == 1 and "--name" in r.stderr and says in r.stderr, (name, r.stderr)
    st = json.loads(run(user, "token", "stat", token).stdout)
    assert (st["fileName"], st["context"]) == ("a.txt", "/docs")
    assert len(run(user, "token", "ls").stdout.splitlines()) == 1  # (no put stored anything)
    r = run(user, "token", "get", token, "/proc/version", check=False)
    assert r.returncode == 4 and r.stderr.count("\n") == 1, r.stderr
    assert "No such file or directory" not in r.stderr and "/proc" in r.stderr and "proc" in r.stderr, r.stderr


def test_token_ls_shows_a_name_with_terminal_escapes_and_line_breaks_escaped(user, tmp_path):
    """Another application's token name was printed byte for byte: an escape sequence in it
    changed the terminal's title and colours, a line break split its row (helper hAG L1)."""
    src = tmp_path / "x.txt"
    src.write_bytes(b"x")

    async def store() -> None:
        from privifs.client.datatokens import FileMeta
        from privifs.client.vault import Vault
        from privifs.crypto.keys import load_aes_key

        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], user["PRIVICORE_PASSWORD"])
        urls = {k: user[f"PRIVICORE_{k.upper()}_URL"] for k in ("api", "ws", "upstream", "downstream")}
        async with connect(Endpoints.from_dict(urls), credentials) as client:
            key = load_aes_key(tmp_path / "config" / "privifs" / "aes.key")
            name = "evil\x1b]0;TITLE\x07\x1b[31mred\nsecond\u202eline"
            await Vault(client.tokens, key).put_bytes(b"x", FileMeta(name, "", "/odd", 1, "/odd/" + name))

    trio.run(store)
    rows = [line for line in run(user, "token", "ls").stdout.splitlines() if "/odd/" in line]
    assert len(rows) == 1 and "\x1b" not in rows[0] and "\x07" not in rows[0], rows
    assert rows[0].endswith("/odd/evil\\x1b]0;TITLE\\x07\\x1b[31mred\\nsecond\\u202eline"), rows
