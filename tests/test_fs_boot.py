"""Boot and fstab: ``mount -t fuse.privifs`` through the installed ``mount.fuse.privifs`` helper,
a plain ``umount DIR`` that loses nothing, and the helper's option translation (in-process)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privifs.cli.mount_helper import main as helper_main
from privifs.cli.mount_helper import translate
from privifs.paths import pid_alive
from tests.mountkit import HELPER_LINK, Mount, helper_link_kept, is_mounted


@contextlib.contextmanager
def installed_helper():
    """/sbin/mount.fuse.privifs → this virtualenv's helper for the test (as scripts/install does),
    put back as it was afterwards."""
    helper = Path(sys.executable).parent / "mount.fuse.privifs"
    assert helper.exists(), "the mount.fuse.privifs console script is not installed; run scripts/install"
    assert HELPER_LINK.is_symlink() or not HELPER_LINK.exists(), f"{HELPER_LINK} is not ours"
    with helper_link_kept():
        tmp = HELPER_LINK.with_name(".mount.fuse.privifs.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(helper)
        tmp.replace(HELPER_LINK)
        yield


def fstype(path: Path) -> str | None:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(path):
                return fields[2]
    return None


def mount_t(m: Mount, options: str) -> subprocess.CompletedProcess:
    config = m.root / "config" / "privifs" / "config.toml"
    return subprocess.run(
        ["mount", "-t", "fuse.privifs", "-o", f"{options},config={config}", "privifs", str(m.dir)],
        env=m.env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_mount_t_fuse_privifs_works_and_a_plain_umount_loses_nothing(engine, tmp_path):
    m = Mount(tmp_path, engine.urls)
    try:
        with installed_helper():
            r = mount_t(
                m,
                "rw,_netdev,x-systemd.automount,x-systemd.idle-timeout=60,cache_size=64M,"
                "refresh_interval=1,write_back_delay=3",
            )
            assert r.returncode == 0, r.stdout + r.stderr
            assert fstype(m.dir) == "fuse.privifs"
            pid = m.pid
            data = os.urandom(300_000)
            (m.dir / "last-minute.bin").write_bytes(data)  # closed just before the unmount, still staged
            r = subprocess.run(["umount", str(m.dir)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert not is_mounted(m.dir)
            deadline = time.monotonic() + 90  # the daemon finishes the upload after the unmount, then exits
            while pid_alive(pid):
                assert time.monotonic() < deadline, "the daemon did not exit after umount"
                time.sleep(0.1)
            assert ("/", "last-minute.bin") in [(t["context"], t["fileName"]) for t in m.tokens()]
            fstab = tmp_path / "fstab"  # the README's line, read by mount(8) as /etc/fstab would be
            config = m.root / "config" / "privifs" / "config.toml"
            fstab.write_text(
                f"privifs  {m.dir}  fuse.privifs  _netdev,x-systemd.automount,nofail,ro,cache_size=2G,"
                f"config={config}  0  0\n"
            )
            r = subprocess.run(
                ["mount", "-T", str(fstab), str(m.dir)], env=m.env, capture_output=True, text=True, timeout=180
            )
            assert r.returncode == 0, r.stdout + r.stderr
            assert fstype(m.dir) == "fuse.privifs"
            assert (m.dir / "last-minute.bin").read_bytes() == data
            with pytest.raises(OSError) as info:
                (m.dir / "new.txt").write_text("refused")
            assert info.value.errno == errno.EROFS
            r = subprocess.run(["umount", str(m.dir)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and not is_mounted(m.dir), r.stderr
    finally:
        m.cleanup()


def mount_source(path: Path) -> str | None:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(path):
                return fields[0].replace("\\054", ",")
    return None


@pytest.mark.slow
def test_the_source_mount_8_is_given_names_the_mount_and_the_helper_is_silent(engine, tmp_path):
    """'mount -t fuse.privifs SOURCE DIR' showed every privifs mount as 'privifs' in /proc/mounts,
    whatever SOURCE was: two mounts could not be told apart by their source (findmnt -S, df,
    xfstests' TEST_DEV/SCRATCH_DEV checks, 'umount SOURCE'); and it printed 'mounted … at DIR',
    which made every xfstests test that remounts fail on its output. The helper is run as mount(8)
    runs it."""
    m = Mount(tmp_path, engine.urls)
    try:
        m.mount()  # provisions the vault
        m.umount()
        config = m.root / "config" / "privifs" / "config.toml"
        helper = [sys.executable, "-c", "import sys; from privifs.cli.mount_helper import main; sys.exit(main())"]
        r = subprocess.run(
            [*helper, "vault,one", str(m.dir), "-o", f"rw,config={config}"],
            env=m.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout == "", (
            "mount(8) helpers are silent on success (xfstests compares the output of tests that mount)"
        )
        assert mount_source(m.dir) == "vault,one"
        assert fstype(m.dir) == "fuse.privifs"
        m.umount()
        m.mount()  # privifs mount itself: the source stays 'privifs'
        assert mount_source(m.dir) == "privifs"
    finally:
        m.cleanup()


def test_helper_translates_mount_options_into_privifs_mount():
    args, fake = translate(
        [
            "privifs",
            "/mnt/v",
            "-n",
            "-o",
            "rw,_netdev,x-systemd.automount,nofail,allow_other,noexec,xattrs,cache_size=1G,config=/etc/p.toml",
        ]
    )
    assert args == [
        "--config",
        "/etc/p.toml",
        "mount",
        "/mnt/v",
        "--allow-other",
        "--noexec",
        "--xattrs",
        "--cache-size",
        "1G",
    ]
    assert not fake
    args, _ = translate(["scratch-vault", "/mnt/v", "-o", "rw"])
    assert args == ["mount", "/mnt/v", "--fsname", "scratch-vault"]
    args, fake = translate(["privifs", "/mnt/v", "-f", "-o", "ro,uid=1000,gid=100,umask=077,refresh_interval=5"])
    assert args == [
        "mount",
        "/mnt/v",
        "--read-only",
        "--uid",
        "1000",
        "--gid",
        "100",
        "--umask",
        "077",
        "--refresh-interval",
        "5",
    ]
    assert fake


def test_helper_refuses_unknown_options_and_a_missing_configuration(tmp_path, capsys, monkeypatch):
    assert helper_main(["privifs", str(tmp_path), "-o", "frobnicate"]) == 1
    assert "unknown mount option 'frobnicate'" in capsys.readouterr().err
    # mount -o remount,ro DIR of something that is not a privifs mount
    assert helper_main(["privifs", str(tmp_path), "-o", "remount,ro"]) == 32
    assert f"{tmp_path} is not a privifs mount" in capsys.readouterr().err
    assert helper_main(["privifs", str(tmp_path), "-s", "-f", "-o", f"frobnicate,config={__file__}"]) == 0
    monkeypatch.setenv("PRIVIFS_CONFIG", str(tmp_path / "missing.toml"))
    assert helper_main(["privifs", str(tmp_path), "-o", "rw"]) == 32
    assert "no privifs configuration" in capsys.readouterr().err


def test_remount_flags_are_the_options_given_and_always_nosuid_nodev():
    from privifs.cli import remount as r

    shown = {"rw", "nosuid", "nodev", "relatime", "user_id=0", "group_id=0", "default_permissions"}
    base = r.MS_REMOUNT | r.MS_NOSUID | r.MS_NODEV
    assert r.remount_flags(shown, ["ro"]) == base | r.MS_RELATIME | r.MS_RDONLY
    # ro/rw and the atime family stay when none of them is named; noexec is on only when named
    assert r.remount_flags(shown - {"rw"} | {"ro", "noexec", "nodiratime"}, []) == (
        base | r.MS_RELATIME | r.MS_RDONLY | r.MS_NODIRATIME
    )
    assert r.remount_flags(shown | {"noexec"}, ["noexec"]) == base | r.MS_RELATIME | r.MS_NOEXEC
    # what mount(8) hands the helper for 'mount -o remount,exec DIR' of a noexec mount: its
    # current options with noexec taken out (libmount applies 'exec' that way)
    merged = ["rw", "nosuid", "nodev", "relatime", "remount", "user_id=0", "group_id=0", "default_permissions"]
    assert r.remount_flags(shown | {"noexec"}, merged) == base | r.MS_RELATIME
    assert r.remount_flags(shown - {"rw"} | {"ro"}, ["rw", "noatime"]) == base | r.MS_NOATIME
    assert r.remount_flags({"rw"}, []) == base | r.MS_STRICTATIME  # no atime word shown: strictatime
    assert r.remount_flags(shown, ["suid", "dev", "exec", "ro", "rw"]) == base | r.MS_RELATIME  # the last ro/rw wins
    assert translate(["privifs", "/mnt/v", "-o", "remount,ro,cache_size=1G"]) == (
        ["remount", "/mnt/v", "ro", "cache_size=1G"],
        False,
    )


def test_noexec_at_mount_time_is_applied(engine, tmp_path):
    """An fstab line's 'noexec' was ignored at mount time (programs on the drive ran), while a
    remount applied it: 'privifs mount --noexec' (the helper's 'noexec') mounts it so."""
    m = Mount(tmp_path, engine.urls)
    with m.mounted("--noexec"):
        assert {"noexec", "nosuid", "nodev"} <= mount_flags(m.dir)
        program = m.dir / "program"
        program.write_text("#!/bin/sh\necho ran\n")
        program.chmod(0o755)
        with pytest.raises(PermissionError):
            subprocess.run([str(program)], timeout=30)


def test_remount_exec_undoes_noexec_and_an_unknown_option_is_refused(engine, tmp_path):
    """'mount -o remount,exec DIR' left a noexec mount noexec: mount(8) hands the helper the
    mount's options merged with -o, and applies 'exec' by leaving 'noexec' out, but the helper
    kept every flag not named from the mount as it was. And an option no mount knows
    ('remount,ro,frobnicate') was 'kept' and the remount done, where a mount refuses it.
    The helper is run as mount(8) runs it, with the option string libmount 2.38 builds (seen
    with LIBMOUNT_DEBUG=cxt), without installing it as /sbin/mount.fuse.privifs."""
    m = Mount(tmp_path, engine.urls)
    helper = Path(sys.executable).parent / "mount.fuse.privifs"

    def run_helper(options: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(helper), "privifs", str(m.dir), "-o", options], env=m.env, capture_output=True, text=True, timeout=60
        )

    with m.mounted():
        program = m.dir / "program"
        program.write_text("#!/bin/sh\necho ran\n")
        program.chmod(0o755)
        r = run_helper("remount,noexec")  # as typed by hand: only noexec named
        assert r.returncode == 0, r.stderr
        assert {"rw", "noexec", "nosuid", "nodev"} <= mount_flags(m.dir)
        with pytest.raises(PermissionError):
            subprocess.run([str(program)], timeout=30)
        # mount -o remount,exec DIR
        r = run_helper("rw,nosuid,nodev,relatime,remount,user_id=0,group_id=0,default_permissions")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        flags = mount_flags(m.dir)
        assert "noexec" not in flags and {"rw", "nosuid", "nodev"} <= flags
        assert subprocess.run([str(program)], capture_output=True, text=True, timeout=30).stdout == "ran\n"
        # a writable shared mapping keeps the file open for writing after its descriptor is closed
        with open(m.dir / "mapped.bin", "wb") as f:
            f.write(b"\0" * 4096)
        fd = os.open(m.dir / "mapped.bin", os.O_RDWR)
        mapped = mmap.mmap(fd, 4096)
        os.close(fd)
        r = run_helper("remount,ro")
        mapped.close()
        assert r.returncode == 32 and "mapped writable" in r.stderr, r.stderr
        r = run_helper("remount,ro,frobnicate")
        assert r.returncode == 1 and "unknown mount option 'frobnicate'" in r.stderr, r.stderr
        assert "rw" in mount_flags(m.dir)
        (m.dir / "still-writable.txt").write_text("yes")


def test_remount_rw_of_a_read_only_drive_is_refused_when_the_helper_has_another_home(engine, tmp_path):
    """mount(8) runs its helper without HOME (util-linux drops it), so the helper read the
    registry of another home than the daemon's: 'mount -o remount,rw' of a drive privifs
    mounted read-only (started with HOME=/somewhere, as in a container or a test) was done, the
    kernel said rw and every write failed EROFS. The daemon is now also found through /proc."""
    m = Mount(tmp_path, engine.urls)
    helper = Path(sys.executable).parent / "mount.fuse.privifs"
    env = {k: v for k, v in m.env.items() if k != "HOME" and not k.startswith("XDG_")}  # another home's registry
    env["HOME"] = str(tmp_path / "another-home")
    with m.mounted("--read-only"):
        assert "ro" in mount_flags(m.dir)
        r = subprocess.run(
            [str(helper), "privifs", str(m.dir), "-o", "rw,nosuid,nodev,relatime,remount"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 32 and "mounted read-only by privifs" in r.stderr, r.stdout + r.stderr
        assert "ro" in mount_flags(m.dir)


def mount_flags(path: Path) -> set[str]:
    from privifs.kernelmounts import mount_options

    return mount_options(str(path))


def test_mount_o_remount_switches_read_only_and_back_without_the_daemon(engine, tmp_path):
    """'mount -o remount,ro DIR' was refused ("remount is not supported"): an administrator could
    not make a drive read-only (xfstests generic/294, 306, 452) without unmounting it. The
    kernel switches ro/rw, noexec and the atime flags; nosuid and nodev stay; a file open for
    writing makes the kernel refuse (EBUSY), and a mount privifs itself made read-only cannot be
    remounted rw."""
    m = Mount(tmp_path, engine.urls)

    def remount(options: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["mount", "-o", f"remount,{options}", str(m.dir)], env=m.env, capture_output=True, text=True, timeout=60
        )

    try:
        with installed_helper():
            assert mount_t(m, "rw").returncode == 0
            pid = m.pid
            (m.dir / "before.txt").write_text("written before")
            with open(m.dir / "open-for-writing.txt", "w") as busy:
                busy.write("x")
                r = remount("ro")
                assert r.returncode != 0 and "open for writing" in r.stderr, r.stdout + r.stderr
            r = remount("ro")
            assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
            assert {"ro", "nosuid", "nodev"} <= mount_flags(m.dir)
            with pytest.raises(OSError) as info:
                (m.dir / "refused.txt").write_text("no")
            assert info.value.errno == errno.EROFS
            assert (m.dir / "before.txt").read_text() == "written before"
            # the options it runs with, as mount(8) repeats an fstab line's: nothing to name (hAN F1)
            config = m.root / "config" / "privifs" / "config.toml"
            limit = m.status()["cache"]["limit"]
            r = remount(f"ro,config={config},cache_size={limit},write_back_delay=1,umask=022,fsync=vault")
            assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
            r = remount("rw,noexec,cache_size=1G")
            assert r.returncode == 0, r.stdout + r.stderr
            assert "cache_size=1G" in r.stderr and "stay as they were" in r.stderr
            flags = mount_flags(m.dir)
            assert "rw" in flags and {"noexec", "nosuid", "nodev"} <= flags
            (m.dir / "after.txt").write_text("written after")
            assert m.pid == pid, "a remount is the kernel's: the same daemon serves the mount"
            m.umount()
            assert ("/", "after.txt") in [(t["context"], t["fileName"]) for t in m.tokens()]
            assert mount_t(m, "ro").returncode == 0
            r = remount("rw")
            assert r.returncode != 0 and "mounted read-only by privifs" in r.stderr, r.stdout + r.stderr
            assert "ro" in mount_flags(m.dir)
            os.kill(m.pid, 9)  # a dead mount (ENOTCONN): said so, nothing attempted
            r = remount("rw")
            assert r.returncode != 0 and "its daemon is gone" in r.stderr, r.stdout + r.stderr
            assert "Traceback" not in r.stderr
    finally:
        m.cleanup()


def test_helper_exits_with_mount_8s_usage_code_for_an_option_value_privifs_refuses(tmp_path, capsys):
    # 'cache_size=huge' reached argparse, whose exit 2 passed through as the helper's status:
    # "system error" to mount(8), not "incorrect invocation" (1)
    config = tmp_path / "config.toml"
    config.write_text("[server]\nembedded = true\n")
    assert helper_main(["privifs", str(tmp_path), "-o", f"cache_size=huge,config={config}"]) == 1
    err = capsys.readouterr().err
    assert "not a size: 'huge'" in err and len(err.strip().splitlines()) == 1


def test_the_systemd_user_unit_runs_commands_privifs_accepts():
    import configparser
    import shlex

    from privifs.cli import build_parser

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(Path(__file__).parent.parent / "contrib" / "systemd" / "privifs.service")
    for key, command in (("ExecStart", "mount"), ("ExecStop", "umount")):
        argv = shlex.split(unit["Service"][key].replace("%h", "/home/u"))
        assert argv[0].endswith("/privifs")
        args = build_parser().parse_args(argv[1:])
        assert args.command == command and str(args.mountpoint) == "/home/u/privifs"
    assert build_parser().parse_args(shlex.split(unit["Service"]["ExecStart"].replace("%h", "/h"))[1:]).foreground


def test_the_systemd_user_unit_brings_the_drive_back_after_its_daemon_was_killed(engine, tmp_path):
    """Restart=on-failure after the daemon was killed (the OOM killer, kill -9): the unit's
    'ExecStartPre=/bin/mkdir -p %h/privifs' failed on the dead mount it left ("cannot stat:
    Transport endpoint is not connected"), so every restart failed and the drive never came back,
    while its ExecStart ('privifs mount --foreground') cleans a dead mount up. The unit's commands
    are run here as systemd runs them ('-' before a command: its failure is ignored)."""
    import configparser
    import shlex
    import signal

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(Path(__file__).parent.parent / "contrib" / "systemd" / "privifs.service")
    m = Mount(tmp_path, engine.urls)
    home = Path(m.env["HOME"])
    home.mkdir(parents=True, exist_ok=True)
    drive = home / "privifs"

    def command(key: str) -> tuple[list[str], bool]:
        line = unit["Service"][key].replace("%h", str(home))
        ignore = line.startswith("-")
        argv = shlex.split(line.lstrip("-"))
        if argv[0].endswith("/privifs"):
            argv = [sys.executable, "-m", "privifs", *argv[1:]]
        return argv, ignore

    def start() -> subprocess.Popen:
        argv, ignore = command("ExecStartPre")
        pre = subprocess.run(argv, env=m.env, capture_output=True, text=True, timeout=60)
        assert pre.returncode == 0 or ignore, f"ExecStartPre failed, so the unit does: {pre.stderr}"
        argv, _ = command("ExecStart")
        proc = subprocess.Popen(argv, env=m.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the unit's mount did not come up"
            try:
                if is_mounted(drive) and live(drive):
                    return proc
            except OSError:  # the dead mount, until the new daemon cleaned it up
                pass
            time.sleep(0.1)

    def live(path: Path) -> bool:
        os.statvfs(path)
        return os.stat(path).st_ino == 1  # the root of a FUSE mount, not the directory under it

    started: list[subprocess.Popen] = []
    try:
        proc = start()
        (drive / "kept.txt").write_text("before the crash")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert is_mounted(drive)  # dead: ENOTCONN for everything
        proc = start()
        assert (drive / "kept.txt").read_text() == "before the crash"
        argv, _ = command("ExecStop")
        stop = subprocess.run(argv, env=m.env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stderr
        proc.wait(timeout=60)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            proc.stderr.close()
        if is_mounted(drive):
            subprocess.run(["fusermount3", "-u", "-z", str(drive)], timeout=30, check=False)
        m.cleanup()


@pytest.mark.slow
def test_a_mount_right_after_a_plain_umount_takes_over_from_the_daemon_still_uploading(eng, tmp_path):
    """'umount DIR; mount DIR' (xfstests' cycle mounts, a remount by hand): the daemon of the
    unmounted drive goes on uploading for up to a minute, holding the mountpoint, and the new
    mount failed with "another privifs is mounting at DIR right now". It now stops that daemon
    (what it had not uploaded stays staged) and mounts; the new daemon uploads the rest."""
    m = Mount(tmp_path, eng.urls)
    try:
        m.mount()
        old = m.pid
        data = os.urandom(2_000_000)
        eng.set_options(stream_bytes_per_second=200_000)  # its upload takes about 10 s
        (m.dir / "big.bin").write_bytes(data)
        r = subprocess.run(["umount", str(m.dir)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert pid_alive(old), "the daemon had already ended: the drain this test needs did not happen"
        r = m.mount(check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert m.pid != old and not pid_alive(old)
        assert (m.dir / "big.bin").read_bytes() == data
        eng.set_options(stream_bytes_per_second=0)
        m.umount()
        assert ("/", "big.bin") in [(t["context"], t["fileName"]) for t in m.tokens()]
    finally:
        eng.set_options(stream_bytes_per_second=0)
        m.cleanup()
