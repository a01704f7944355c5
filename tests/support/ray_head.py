"""A real `ray start --head` in a subprocess for the job-submission tests, and its cleanup.

The head gets its own temp dir, free ports for every listener and an explicit token, so it
neither collides with nor touches other Ray instances on this machine (nor ~/.ray/auth_token);
`stop_head` kills only its own process group and processes naming its temp dir.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray address/auth settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop this head only: its process group, then stragglers that name its temp dir."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if temp_dir.encode() in (pid_dir / "cmdline").read_bytes():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    proc.wait(timeout=10)


@contextlib.contextmanager
def running_head(num_cpus: int, start_timeout_s: float = 120):
    """Yields {"address": dashboard URL, "token", "temp_dir"} of a head that requires the token
    (temp_dir holds its session directories: logs, runtime env files)."""
    import requests

    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rhead", dir="/tmp")  # short: socket paths are limited
    dashboard_port = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={free_port()}", f"--dashboard-port={dashboard_port}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"--{flag}={free_port()}" for flag in (
               "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port",
               "node-manager-port", "object-manager-port"))]
    log_path = Path(f"{temp_dir}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                if requests.get(f"{address}/api/authentication_mode", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray dashboard did not come up in {start_timeout_s:.0f} s")
            time.sleep(0.5)
        yield {"address": address, "token": token, "temp_dir": temp_dir}
    finally:
        stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream_port`, to break connections for real:
    `stop()` closes the listener and every open connection (as a dying `kubectl
    port-forward` does), `start()` listens again on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream_port, self.port = upstream_port, free_port()
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = [self._listener, *self._sockets], []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.accepted += 1
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
