"""Find or start the embedded engine: ``privifs engine`` as its own process on free loopback
ports, its data under the user's data directory.

A running engine holds an exclusive lock on ``<data-dir>/lock`` and publishes its URLs in
``<data-dir>/urls.json``; callers reuse it. An engine started here (by
:class:`~privifs.engine_process.EngineProcess`, the one engine starter) dies with the process that
started it (``PR_SET_PDEATHSIG``), so a killed mount leaves no orphan; its data is durable.

:meth:`EmbeddedEngine.ensure` also watches the engine it hands out: when that engine dies (it
crashed, was killed, or the other process that owned it stopped it), a watcher thread logs why and
starts it again on the same ports and data directory, so the URLs the caller holds keep working;
where another program took one of those ports meanwhile, on new ports, which it tells the caller
(``on_moved``). A command that ends soon (``defer_to_starter``) leaves that restart to the engine's
starter for :data:`DEFER_TO_STARTER` seconds and follows the engine it starts.
The ports are also kept in ``<data-dir>/ports.json`` across stops: the next start takes them
again where they are free, so other clients (other users' configurations on this machine: the
engine listens on loopback only) that reach this vault through those URLs keep reaching it after
this machine's unmount and mount.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from privifs import paths
from privifs.client.tls import shared_tls_context
from privifs.engine_process import SERVERS, EngineProcess, EngineStartFailed

log = logging.getLogger("privifs.embedded")

WATCH_INTERVAL = 0.5
LAST_PORTS = "ports.json"  # in the data directory: the ports of the engine's last run
RESTART_BACKOFF_MAX = 30.0
# a short-lived command leaves an engine another process started (a mount's) this long to that
# process's watcher before it starts it again: whoever wins the race owns the new engine, and a
# command that won took it down when it ended, the mount's server gone for seconds (helper hAW F1)
DEFER_TO_STARTER = 5.0


def _port_free(port: int) -> bool:
    """Whether a loopback TCP port can be bound (the engine's own sockets are closed by then)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedEngine:
    def __init__(self, data_dir: Path | None = None, *, defer_to_starter: bool = False):
        """``defer_to_starter``: for a command that ends soon, not a mount (:data:`DEFER_TO_STARTER`)."""
        self.data_dir = data_dir or paths.embedded_engine_dir()
        self.restart_grace = DEFER_TO_STARTER if defer_to_starter else 0.0
        self.process: EngineProcess | None = None  # the engine this object started, if any
        self.urls: dict[str, str] | None = None
        self.restarts = 0
        self._lock = threading.Lock()  # start/stop/restart one at a time
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._restarting = False  # the watcher found the engine dead and is starting it again
        # (since when, why) its starts have failed, until one succeeds: for privifs status, which
        # said only that the server stopped answering (helper hL3: another program on its port)
        self.restart_failure: tuple[float, str] | None = None
        # told the new URLs when a restart had to take new ports (their holders follow them)
        self.on_moved: Callable[[dict[str, str]], None] | None = None

    def _locked_by_other(self) -> bool:
        return paths.lock_held(self.data_dir / "lock")

    def running_urls(self) -> dict[str, str] | None:
        urls_file = self.data_dir / "urls.json"
        deadline = time.monotonic() + 5
        while self._locked_by_other():
            try:
                urls = json.loads(urls_file.read_text())
                if httpx.get(urls["api"] + "/health", timeout=3, verify=shared_tls_context()).status_code == 200:
                    return urls
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        return None

    def ensure(self, watch: bool = True) -> dict[str, str]:
        """URLs of the engine for this data dir, starting one (owned by this process) if none runs;
        with ``watch``, a dead engine is started again on the same ports until :meth:`stop`."""
        with self._lock:
            urls = self.running_urls()
            if urls is None and self._locked_by_other():
                raise EngineStartFailed(self._silent_holder())
            self.urls = urls if urls is not None else self.start()
        if watch and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="embedded-engine-watch", daemon=True)
            self._watcher.start()
        return dict(self.urls)

    def _silent_holder(self) -> str:
        """What to tell of an engine that holds this data directory and does not answer (a start
        then failed with "another engine is already using …", which hid why)."""
        pid = paths.flock_holder(self.data_dir / "lock")
        if pid is not None and paths.pid_stopped(pid):
            return (
                f"the embedded engine (pid {pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) and answers nothing: "
                f"'kill -CONT {pid}' lets it go on"
            )
        who = f" (pid {pid})" if pid is not None else ""
        return f"the embedded engine{who} holds {self.data_dir} but does not answer"

    def _ports(self) -> dict[str, int]:
        if not self.urls:
            return {name: 0 for name in SERVERS}
        return {name: int(self.urls[name].rsplit(":", 1)[1]) for name in SERVERS}

    @property
    def proc(self) -> subprocess.Popen | None:
        """The engine process this object started (None if it reuses another process's engine)."""
        return self.process.proc if self.process is not None else None

    def start(self, ports: dict[str, int] | None = None) -> dict[str, str]:
        """Start the engine on ``ports``; with None, on the ports of its last run where they
        are free (:data:`LAST_PORTS`), else on new ones."""
        paths.private_dir(self.data_dir)
        last = self._last_ports() if ports is None else None
        if last is not None:
            try:
                return self._start(last)
            except EngineStartFailed as exc:
                log.info("the embedded engine takes new ports: its ports of last time are not free (%s)", exc)
        return self._start(ports)

    def _start(self, ports: dict[str, int] | None) -> dict[str, str]:
        self.process = EngineProcess(
            self.data_dir,
            ports=ports,
            settings={"owner_registers_only": "true"},  # other local users see its ports (helper hAO F3)
            die_with_parent=True,
            what="the embedded engine",
        )
        urls = dict(self.process.start().urls)
        if self._last_ports() != self.process.ports:
            self._remember_ports(self.process.ports)
        return urls

    def _remember_ports(self, ports: dict[str, int]) -> None:
        path = self.data_dir / LAST_PORTS
        try:
            paths.write_json(path, ports)
        except OSError as exc:  # the engine runs; only its next start may take other ports
            log.warning("the embedded engine's ports could not be kept in %s: %s", path, exc.strerror or exc)

    def _last_ports(self) -> dict[str, int] | None:
        try:
            ports = json.loads((self.data_dir / LAST_PORTS).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(ports, dict) or sorted(ports) != sorted(SERVERS):
            return None
        if not all(type(p) is int and 0 < p < 65536 for p in ports.values()):
            return None
        return ports

    def stop(self) -> None:
        """Stop watching, and stop the engine if this process started it."""
        self._stopping.set()
        with self._lock:
            self._terminate()

    def _terminate(self) -> None:
        if self.process is not None:
            self.process.stop()

    # -- supervision -------------------------------------------------------------------------------
    def restarting(self) -> bool:
        """Whether the engine handed out is down and the watcher starts it again: it cannot be
        reached for a few seconds (or longer if its starts fail), not for good. Safe to call
        from any thread."""
        if self._watcher is None or self._stopping.is_set():
            return False
        return self._restarting or self._death() is not None

    def stopped_pid(self) -> int | None:
        """The pid of the engine handed out if it is stopped (SIGSTOP, Ctrl-Z, a debugger): it
        accepts connections and answers nothing until it is continued, which a client sees
        only after its read time-outs. None while it runs, or if another process started it.
        Safe to call from any thread."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid if paths.pid_stopped(proc.pid) else None

    def _death(self) -> str | None:
        """Why the engine we hand out is gone, or None while it runs."""
        proc = self.proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                return None
            last = self._last_log_line()
            return (
                f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            ) + f" (pid {proc.pid}{'; its last log line: ' + last if last else ''})"
        if self._locked_by_other():
            return None  # another process's engine, still running
        return "started by another process has stopped"

    def _last_log_line(self) -> str:
        try:
            with open(self.data_dir / "engine.log", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def _start_again(self) -> None:
        """Start the dead engine on its ports, or, where another program took one of them while
        it was down, on new ones, which the URLs handed out then follow (:attr:`on_moved`):
        another user's program could otherwise hold the vault offline for as long as it liked
        (helper hAD F1; the clients send it nothing, client/peers.py)."""
        ports = self._ports()
        taken = [port for port in ports.values() if port and not _port_free(port)]
        if not taken or not self.urls:
            self.start(ports)
            return
        log.warning(
            "the embedded engine's port%s %s %s taken by another program; starting it on new ports",
            "s" if len(taken) > 1 else "",
            ", ".join(map(str, taken)),
            "are" if len(taken) > 1 else "is",
        )
        self._move_to(self._start(None))

    def _move_to(self, urls: dict[str, str]) -> None:
        """The engine now answers at ``urls``: hand them out, and tell the caller (:attr:`on_moved`)."""
        self.urls = urls
        if self.on_moved is not None:
            self.on_moved(dict(urls))

    def _follow_restarted(self, running: dict[str, str] | None) -> None:
        """Another process started the engine this one used again, now answering at ``running``:
        hand those URLs out if it had to take new ports."""
        if running is not None and running != self.urls:
            log.info("the embedded engine runs again at %s, started by another process", running.get("api"))
            self._move_to(running)

    def _watch(self) -> None:
        """The watcher thread: restart a dead engine on the same ports. It must not end before
        :meth:`stop` (an engine it started gets SIGTERM when its starting thread ends)."""
        backoff = WATCH_INTERVAL
        stopped: int | None = None  # the pid of the engine last seen stopped (logged once)
        adopted_dead_since: float | None = None  # when another process's engine was found gone
        while not self._stopping.wait(backoff):
            try:
                why = self._death()
                if why is not None and self.proc is None and self.restart_grace:
                    adopted_dead_since = adopted_dead_since or time.monotonic()
                    if time.monotonic() - adopted_dead_since < self.restart_grace:
                        continue  # (restarting() says so meanwhile: clients ride the gap out)
                if why is None and adopted_dead_since is not None:
                    adopted_dead_since = None
                    self._follow_restarted(self.running_urls())
                if why is None:
                    backoff = WATCH_INTERVAL
                    now = self.stopped_pid()
                    if now != stopped:
                        if now is not None:
                            log.warning(
                                "the embedded engine (pid %d) is stopped (SIGSTOP, Ctrl-Z or a debugger): it answers "
                                "nothing until 'kill -CONT %d' (or 'kill -9 %d': it is then started again)",
                                now,
                                now,
                                now,
                            )
                        else:
                            log.info("the embedded engine (pid %d) runs again", stopped)
                        stopped = now
                    continue
                stopped = None
                adopted_dead_since = None
                self._restarting = True
                with self._lock:
                    if self._stopping.is_set():
                        return
                    log.warning(
                        "the embedded engine %s; starting it again on %s (its log: %s)",
                        why,
                        self.urls.get("api") if self.urls else "new ports",
                        self.data_dir / "engine.log",
                    )
                    # another mount may have started it again already, maybe on other ports (its
                    # were taken): that engine is adopted, URLs and all (helper hAE: a mount
                    # whose URLs differed tried to start a second one and said ENGINE DOWN)
                    running = self.running_urls()
                    if running is not None:
                        self.process = None
                        self._follow_restarted(running)
                    else:
                        self._start_again()
                    self.restarts += 1
                    self._restarting = False
                    self.restart_failure = None
                log.info("the embedded engine is back at %s", self.urls.get("api") if self.urls else "?")
                backoff = WATCH_INTERVAL
            except Exception as exc:  # noqa: BLE001 - keep trying: the mount depends on it
                backoff = min(max(backoff * 2, 1.0), RESTART_BACKOFF_MAX)
                since = self.restart_failure[0] if self.restart_failure else time.time()
                self.restart_failure = (since, f"{exc}; trying again every {RESTART_BACKOFF_MAX:.0f}s at most")
                log.error("could not restart the embedded engine (%s); trying again in %.0fs", exc, backoff)
