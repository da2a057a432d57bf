"""HAProxy in front of the replicas, as a Kubernetes Service: layer 4, new connections only to
replicas whose /ready passes, no retry of a refused one, and a runtime API (its stats socket)
through which the rollout adds and removes endpoints."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tutorial.parts import waiting

from . import budget
from .processes import FleetError, Part, tool, wait_port


def stats_socket(runtime: Path) -> Path:
    """HAProxy's admin socket: in the runtime folder, unless that path is longer than HAProxy
    takes (97 bytes); then in the temp folder, named after the runtime folder, so that a
    `make rollout` taking over this fleet finds it too."""
    here = runtime.resolve() / "haproxy.sock"
    if len(str(here).encode()) <= 97:
        return here
    tag = hashlib.sha256(str(here).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"aiohttp-fleet-{tag}.sock"


class HAProxy:
    def __init__(
        self,
        runtime: Path,
        port: int,
        readiness: budget.Probe,
        servers: list[str],
        metrics_port: int | None = None,
    ):
        """`servers`: every replica slot's host:port, in slot order; each starts disabled.
        `metrics_port`: where HAProxy's own Prometheus exporter listens (chapter 10 on)."""
        self.runtime, self.port, self.readiness, self.servers = runtime, port, readiness, servers
        self.metrics_port = metrics_port
        self.socket = stats_socket(runtime)
        self.part: Part | None = None

    @property
    def alive(self) -> bool:
        return self.part is not None and self.part.alive

    def config(self) -> str:
        r = self.readiness
        lines = [
            "global",
            f"    stats socket {self.socket} mode 600 level admin",
            "defaults",
            "    mode tcp",  # layer 4, like kube-proxy: a connection goes to one pod
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "    retries 0",  # a refused connection is the client's failure, as with kube-proxy
            "frontend service",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
            "    option httpchk GET /ready",  # the readinessProbe, with its period and threshold
            "    http-check expect status 200",
            f"    timeout check {r.timeout}s",
            f"    default-server inter {r.period}s fall {r.failures} rise 1",
        ]
        lines += [
            f"    server s{slot} {address} check disabled"
            for slot, address in enumerate(self.servers)
        ]
        if self.metrics_port is not None:  # HAProxy's built-in exporter, on a port of its own
            lines += [
                "frontend metrics",
                "    mode http",
                f"    bind 127.0.0.1:{self.metrics_port}",
                "    http-request use-service prometheus-exporter if { path /metrics }",
                "    http-request return status 404",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        cfg = self.runtime / "haproxy.cfg"
        cfg.write_text(self.config())
        check = subprocess.run(
            [tool("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:  # the first ALERT says why; the ones after it sum up
            alerts = [line for line in check.stderr.splitlines() if "[ALERT]" in line]
            raise FleetError(f"haproxy rejected {cfg}: {(alerts or ['no reason given'])[0]}")
        self.part = Part(
            "haproxy", [tool("haproxy"), "-db", "-f", str(cfg)], self.runtime / "haproxy.log"
        )
        wait_port(self.part, self.port)
        # Its port accepts a moment before its admin socket exists (7 starts in 100 here), and the
        # replicas are added through that socket.
        try:
            waiting.until(
                lambda: self.command("show info"),
                timeout=15,
                retry_on=(OSError,),
                waiting_for=f"HAProxy's admin socket {self.socket}",
            )
        except TimeoutError as exc:
            raise FleetError(str(exc)) from None

    def stop(self) -> None:
        if self.part:
            self.part.stop(signal.SIGUSR1, timeout=5)  # HAProxy's soft stop

    def command(self, command: str) -> str:
        """One command to the runtime API, and its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket))
            sock.sendall(command.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def enable(self, slot: int) -> None:
        """The endpoint is added: HAProxy may send it new connections (its own check still
        applies)."""
        self.command(f"set server replicas/s{slot} state ready")

    def disable(self, slot: int) -> None:
        """The endpoint is removed: no new connections; those already open carry on."""
        self.command(f"set server replicas/s{slot} state maint")
