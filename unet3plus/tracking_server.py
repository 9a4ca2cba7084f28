"""A team's tracking server on one machine: PostgreSQL plus ``mlflow server --app-name basic-auth``.

The same server the Kubernetes manifests in ``deploy/mlflow/`` run, for a workstation
(``make tracking-server``), the integration tests and the load benchmark:

- :class:`Postgres`: a private PostgreSQL cluster in a folder (``initdb``/``pg_ctl``), listening on
  127.0.0.1 only, password authentication (scram-sha-256). PostgreSQL refuses to run as root, so
  under root its commands run as the ``postgres`` user (or ``nobody``) through ``runuser``.
- :class:`MlflowServer`: the tracking server on that database (or any backend store URI), with
  the artifact proxy (``--serve-artifacts``) to a folder and basic authentication; the auth
  app's user table lives in the same PostgreSQL cluster (database ``mlflow_auth``).

Secrets (database password, admin password) are generated once, kept in ``<root>/secrets.env``
(mode 600) and handed to the processes through the environment, never on a command line.

Command line: ``python -m unet3plus.tracking_server start|stop|status [--root .tracking] [--port 5000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

logger = logging.getLogger(__name__)

DATABASE, AUTH_DATABASE, DB_USER, ADMIN = "mlflow", "mlflow_auth", "mlflow", "admin"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin(name: str) -> str:
    """Path of a PostgreSQL server program (``initdb``, ``pg_ctl``): PATH first, then Debian's folders."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise FileNotFoundError(f"PostgreSQL's {name} not found; install PostgreSQL (e.g. apt-get install postgresql)")
    return found


def read_secrets(root: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of ``root/secrets.env``, created with fresh random values on first use."""
    path = root / "secrets.env"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        names = ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
        values = {name: secrets.token_urlsafe(18) for name in names}
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.writelines(f"{key}={value}\n" for key, value in values.items())
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


class Postgres:
    """A PostgreSQL cluster in ``root/pgdata`` on 127.0.0.1:``port`` with databases for MLflow.

    Attributes:
        port: the TCP port.
        password: the password of the ``mlflow`` database user.
    """

    def __init__(self, root: Path, port: int | None = None, password: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.data = self.root / "pgdata"
        self.port = port or free_port()
        self.password = password or read_secrets(self.root)["POSTGRES_PASSWORD"]
        # PostgreSQL refuses to run as root: run its programs as an unprivileged user instead.
        self.user = None
        if os.geteuid() == 0:
            self.user = next(name for name in ("postgres", "nobody") if _user_exists(name))

    def uri(self, database: str = DATABASE) -> str:
        """SQLAlchemy URI of ``database`` (psycopg2 driver), password included: treat it as a secret."""
        return f"postgresql+psycopg2://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def start(self) -> None:
        """Create the cluster and its databases on first use, then start it (returns when it accepts connections)."""
        if not (self.data / "PG_VERSION").is_file():
            self._init()
        self._start()

    def _start(self) -> None:
        # -l: the server's output goes to its log, not to our pipes (which would then never close).
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data}"
        self._run(postgres_bin("pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                  str(self.data / "server.log"), "-o", options)  # fmt: skip
        self._wait()

    def _init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(mode=0o700)
        password_file = self.root / "initdb.pw"  # initdb wants an empty data folder
        password_file.write_text(self.password)
        if self.user:
            account = pwd.getpwnam(self.user)
            self.root.chmod(self.root.stat().st_mode | 0o711)  # the user must reach its data folder
            os.chown(self.data, account.pw_uid, account.pw_gid)
            os.chown(password_file, account.pw_uid, account.pw_gid)
        try:
            self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", DB_USER, "--auth=scram-sha-256",
                      f"--pwfile={password_file}", "-E", "UTF8", "--locale=C")  # fmt: skip
        finally:
            password_file.unlink()
        self._start()
        for database in (DATABASE, AUTH_DATABASE):
            self._psql(f'CREATE DATABASE "{database}"')
        self.stop()

    def _psql(self, sql: str) -> None:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=DB_USER, password=self.password,
                                      dbname="postgres")  # fmt: skip
        connection.autocommit = True
        with contextlib.closing(connection), connection.cursor() as cursor:
            cursor.execute(sql)

    def _wait(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._psql("SELECT 1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back open transactions and disconnect clients)."""
        if (self.data / "postmaster.pid").is_file():
            self._run(postgres_bin("pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.data))

    def restart(self) -> None:
        """Stop (dropping every client connection) and start again on the same port and data."""
        self.stop()
        self.start()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port``: backend store ``backend_uri``, artifacts proxied to ``root/artifacts``.

    With ``auth_database_uri`` the basic-auth app runs (admin ``admin``/``admin_password``);
    without it, no authentication. ``kill()`` simulates a crash, ``start()`` brings it back.
    The server's output goes to ``root/server.log`` (one line per HTTP request: uvicorn's access log).
    """

    def __init__(
        self,
        root: Path,
        backend_uri: str,
        *,
        auth_database_uri: str | None = None,
        admin_password: str | None = None,
        secret_key: str | None = None,
        port: int | None = None,
        workers: int = 1,
    ) -> None:
        self.root = Path(root).resolve()
        self.backend_uri, self.auth_database_uri, self.admin_password = backend_uri, auth_database_uri, admin_password
        self.secret_key = secret_key or secrets.token_urlsafe(18)  # the auth app's CSRF key
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        """Start the server; returns once ``/health`` answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", str(self.workers),
                   "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
                   "--port", str(self.port)]  # fmt: skip
        # Secrets travel in the environment (MLflow reads these variables), not on the command line.
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend_uri}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: it forks helpers that outlive the server
        if self.auth_database_uri:
            command += ["--app-name", "basic-auth"]
            config = self.root / "basic_auth.ini"
            config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {self.auth_database_uri}\n"
                              f"admin_username = {ADMIN}\n"
                              # Without the cache every request re-hashes the password (PBKDF2): ~1 s of CPU.
                              "auth_cache_ttl_seconds = 60\n")  # fmt: skip
            config.chmod(0o600)
            env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password or "",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}  # fmt: skip
        with open(self.log, "ab") as log:  # the server keeps its own copy of the handle
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}); see {self.log}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout} s; see {self.log}")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, number: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, number)  # the server and its workers share the new session
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


_LAUNCHER = """
import json, os, sys
from unet3plus.cli import main
children = []
for argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os._exit(main(argv))
    children.append(pid)
sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))
"""


def run_concurrently(commands: list[list[str]], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``unet3plus`` command lines at once, one process each: the shape of a parallel ablation study.

    The processes are forked from one interpreter that has imported the package but contacted no
    server (saving an import of torch and MLflow per process). Returns the finished launcher, with
    the highest exit status of the commands and their joint stdout/stderr.
    """
    launcher = [sys.executable, "-c", _LAUNCHER, json.dumps(commands)]
    return subprocess.run(launcher, cwd=cwd, env=env, text=True, capture_output=True, timeout=1200)


def request_count(log: Path) -> int:
    """MLflow API requests (tracking, registry, artifacts) in a server log's access lines; health checks excluded."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '"' in line and " /api/" in line)


def main(argv: list[str] | None = None) -> int:
    """``start``: PostgreSQL + MLflow (basic auth) in the background, ``stop``: both, ``status``."""
    parser = argparse.ArgumentParser(
        prog="python -m unet3plus.tracking_server",
        description="A local team tracking server: PostgreSQL + `mlflow server --app-name basic-auth`, data and "
        "generated secrets under --root. `start` prints the MLFLOW_TRACKING_* variables to export.",
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--root", type=Path, default=Path(".tracking"), help="data folder (default: .tracking)")
    parser.add_argument("--port", type=int, default=5000, help="MLflow port on 127.0.0.1 (default: 5000)")
    parser.add_argument("--db-port", type=int, default=5433, help="PostgreSQL port on 127.0.0.1 (default: 5433)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root.resolve()
    pid_file = root / "mlflow.pid"
    postgres = Postgres(root, port=args.db_port)
    if args.action == "stop":
        if pid_file.is_file():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            pid_file.unlink()
        postgres.stop()
        logger.info("tracking server stopped; data kept in %s", root)
        return 0
    url = f"http://127.0.0.1:{args.port}"
    if args.action == "status":
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).ok:
                logger.info("running at %s (data in %s)", url, root)
                return 0
        logger.info("not running (no answer at %s)", url)
        return 1
    postgres.start()
    values = read_secrets(root)
    server = MlflowServer(root / "mlflow", postgres.uri(), auth_database_uri=postgres.uri(AUTH_DATABASE),
                          admin_password=values["MLFLOW_AUTH_ADMIN_PASSWORD"],
                          secret_key=values["MLFLOW_FLASK_SERVER_SECRET_KEY"], port=args.port, workers=2)  # fmt: skip
    server.start()
    pid_file.write_text(str(server.process.pid))
    logger.info(
        "MLflow (basic auth) on PostgreSQL at %s; log %s. Use it with:\n  export MLFLOW_TRACKING_URI=%s "
        "MLFLOW_TRACKING_USERNAME=%s\n"
        "  export MLFLOW_TRACKING_PASSWORD=$(grep ^MLFLOW_AUTH_ADMIN_PASSWORD= %s | cut -d= -f2-)"
        "\nStop it with `make tracking-server-stop`.",
        url, server.log, url, ADMIN, root / "secrets.env",
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
