"""A team's tracking server on one machine: PostgreSQL plus ``mlflow server --app-name basic-auth``.

The same server the Kubernetes manifests in ``deploy/mlflow/`` run, for a workstation
(``make tracking-server``), the integration tests and the load benchmark:

- :class:`Postgres`: a private PostgreSQL cluster in a folder (``initdb``/``pg_ctl``), listening on
  127.0.0.1 only (no Unix socket), password authentication (scram-sha-256). PostgreSQL refuses to
  run as root, so under root its commands run as the ``postgres`` user (or ``nobody``) through
  ``runuser``. Every step of :meth:`Postgres.start` is idempotent: a start that failed half-way
  (port busy) is completed by the next one.
- :class:`MlflowServer`: the tracking server on that database (or any backend store URI), with
  the artifact proxy (``--serve-artifacts``) to a folder and basic authentication; the auth
  app's user table lives in the same PostgreSQL cluster (database ``mlflow_auth``). It starts
  only on a free port and counts as started once *its own* processes listen there and answer
  ``/health``, so a foreign process on the port is never mistaken for it.

Everything under a root is private from its creation: folders 0700, files 0600 (``os.open``
with a mode, the servers under umask 077). Under root the data root is 0710 with the postgres
account's group, so that account can reach its data folder and nothing more.

Secrets (database password, admin password) are generated once, kept in ``<root>/secrets.env``
(mode 600) and handed to the processes through the environment, never on a command line.

Command line: ``python -m unet3plus.tracking_server start|stop|status [--root .tracking] [--port 5000]``.
``stop`` signals only the processes it identifies as this root's servers (by their command line),
never what a stale PID file happens to name.
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

import psutil
import requests

from unet3plus.errors import UserError
from unet3plus.utils import atomic_path

logger = logging.getLogger(__name__)

DATABASE, AUTH_DATABASE, DB_USER, ADMIN = "mlflow", "mlflow_auth", "mlflow", "admin"
PRIVATE_UMASK = 0o077
"""The umask of the servers' processes: what they create under the root is theirs only (0700 / 0600)."""


class ServerError(UserError):
    """The tracking server cannot start as asked: a port is taken, a server exited or does not answer."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether a server could not bind 127.0.0.1:``port`` now (another process listens there)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _refuse_busy(port: int, flag: str) -> None:
    if port_in_use(port):
        raise ServerError(f"127.0.0.1:{port}: the port is in use by another process; stop that process or choose "
                          f"another {flag}")  # fmt: skip


def postgres_bin(name: str) -> str:
    """Path of a PostgreSQL server program (``initdb``, ``pg_ctl``): PATH first, then Debian's folders."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise FileNotFoundError(f"PostgreSQL's {name} not found; install PostgreSQL (e.g. apt-get install postgresql)")
    return found


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (0600) from the moment it exists."""
    with atomic_path(path) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)


def read_secrets(root: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of ``root/secrets.env``, created with fresh random values on first use."""
    path = root / "secrets.env"
    if not path.is_file():
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        names = ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
        values = {name: secrets.token_urlsafe(18) for name in names}
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.writelines(f"{key}={value}\n" for key, value in values.items())
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def find_process(pid: int, argument: str) -> psutil.Process | None:
    """The live process ``pid`` if ``argument`` (e.g. a path under a root) is one of its command-line arguments."""
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        if argument in process.cmdline():
            return process
    return None


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` or one of its descendants listens on TCP ``port`` (it, not another, answers there)."""
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid)
        for process in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")):
                    return True
    return False


def terminate_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid`` (a server and its workers), SIGKILL it after ``timeout`` s."""
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if psutil.wait_procs([leader], timeout=timeout)[1]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            psutil.wait_procs([leader], timeout=timeout)


class Postgres:
    """A PostgreSQL cluster in ``root/pgdata`` on 127.0.0.1:``port`` with databases for MLflow.

    Attributes:
        port: the TCP port (that of the running cluster once :meth:`start` found it running).
        password: the password of the ``mlflow`` database user (read from ``secrets.env`` when first needed).
    """

    def __init__(self, root: Path, port: int | None = None, password: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.data = self.root / "pgdata"
        self.port = port or free_port()
        self._password = password
        # PostgreSQL refuses to run as root: run its programs as an unprivileged user instead.
        self.user = None
        if os.geteuid() == 0:
            self.user = next(name for name in ("postgres", "nobody") if _user_exists(name))

    @property
    def password(self) -> str:
        if self._password is None:
            self._password = read_secrets(self.root)["POSTGRES_PASSWORD"]
        return self._password

    def uri(self, database: str = DATABASE) -> str:
        """SQLAlchemy URI of ``database`` (psycopg2 driver), password included: treat it as a secret."""
        return f"postgresql+psycopg2://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run([*prefix, *command], check=False, capture_output=True, text=True, umask=PRIVATE_UMASK)
        if result.returncode != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise ServerError(f"{self.data}: {Path(command[0]).name} {command[1]} failed ({result.returncode}): "
                              f"{detail[0]}; see {self.data / 'server.log'}")  # fmt: skip
        return result

    def running_pid(self) -> int | None:
        """The postmaster's pid if this cluster runs (``postmaster.pid`` names a live postgres on this data folder)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            return pid if find_process(pid, str(self.data)) else None
        return None

    def start(self) -> None:
        """Create the cluster on first use, start it unless it runs, create missing databases.

        Returns when the databases accept connections. Each step is idempotent, so a start that
        failed half-way (port in use, killed) leaves a cluster that the next start completes.

        Raises:
            ServerError: the port is in use by another process, or a PostgreSQL program failed.
        """
        if not (self.data / "PG_VERSION").is_file():
            self._init()
        if self.running_pid() is None:
            _refuse_busy(self.port, "--db-port")
            # -l: the server's output goes to its log, not to our pipes (which would then never close).
            # -k '': no Unix socket, TCP on 127.0.0.1 only (and no root path inside the shell-parsed -o).
            self._run(postgres_bin("pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                      str(self.data / "server.log"), "-o", f"-h 127.0.0.1 -p {self.port} -k ''")  # fmt: skip
        else:
            self.port = int((self.data / "postmaster.pid").read_text().splitlines()[3])
        self._wait()
        existing = {row[0] for row in self._psql("SELECT datname FROM pg_database")}
        for database in (DATABASE, AUTH_DATABASE):
            if database not in existing:
                self._psql(f'CREATE DATABASE "{database}"')

    def _init(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data.mkdir(mode=0o700, exist_ok=True)  # an empty folder left by a failed initdb is reused
        password_file = self.root / "initdb.pw"  # initdb wants an empty data folder
        write_private(password_file, self.password)
        if self.user:
            account = pwd.getpwnam(self.user)
            # The postgres account must reach its data folder: traversal for its group, nothing else.
            os.chown(self.root, -1, account.pw_gid)
            self.root.chmod(0o710)
            os.chown(self.data, account.pw_uid, account.pw_gid)
            os.chown(password_file, account.pw_uid, account.pw_gid)
        try:
            self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", DB_USER, "--auth=scram-sha-256",
                      f"--pwfile={password_file}", "-E", "UTF8", "--locale=C")  # fmt: skip
        finally:
            password_file.unlink()

    def _psql(self, sql: str) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=DB_USER, password=self.password,
                                      dbname="postgres")  # fmt: skip
        connection.autocommit = True
        with contextlib.closing(connection), connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []

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

    def stop(self, mode: str = "fast") -> bool:
        """Stop the cluster if it runs (``fast``: roll back open transactions, disconnect clients); whether it ran."""
        if self.running_pid() is None:
            return False
        self._run(postgres_bin("pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.data))
        return True

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

    With ``auth_database_uri`` the basic-auth app runs (admin ``admin``/``admin_password``;
    every login may read every experiment, see ``default_permission`` in the README); without
    it, no authentication. ``kill()`` simulates a crash, ``start()`` brings it back.
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
        self.artifacts = self.root / "artifacts"
        self.log = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> None:
        """Start the server; returns once its own processes listen on the port and answer ``/health``.

        Raises:
            ServerError: the port is in use, the server exited, another process took the port, or
                no answer within ``timeout`` s. The server is stopped then: nothing is left running.
        """
        _refuse_busy(self.port, "--port")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.artifacts.mkdir(mode=0o700, exist_ok=True)
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", str(self.workers),
                   "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                   "--port", str(self.port)]  # fmt: skip
        # Secrets travel in the environment (MLflow reads these variables), not on the command line.
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend_uri}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: it forks helpers that outlive the server
        if self.auth_database_uri:
            command += ["--app-name", "basic-auth"]
            config = self.root / "basic_auth.ini"
            write_private(config, f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {self.auth_database_uri}\n"
                                  f"admin_username = {ADMIN}\n"
                                  # Without the cache every request re-hashes the password (PBKDF2): ~1 s of CPU.
                                  "auth_cache_ttl_seconds = 60\n")  # fmt: skip
            env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password or "",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}  # fmt: skip
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:  # the server keeps its own copy of the handle
            self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, umask=PRIVATE_UMASK)  # fmt: skip
        finally:
            os.close(log)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if port_in_use(self.port):
                    raise ServerError(f"127.0.0.1:{self.port}: another process took the port while the MLflow server "
                                      f"started (it exited); choose another --port")  # fmt: skip
                raise ServerError(f"the MLflow server exited at start ({self.process.returncode}); see {self.log}")
            if listens(self.process.pid, self.port):  # the answer below then comes from this server
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{self.url}/health", timeout=2).ok:
                        return
            time.sleep(0.25)
        raise ServerError(f"the MLflow server did not answer {self.url}/health within {timeout:.0f} s; see {self.log}")

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
    return subprocess.run(launcher, check=False, cwd=cwd, env=env, text=True, capture_output=True, timeout=1200)


def request_count(log: Path) -> int:
    """MLflow API requests (tracking, registry, artifacts) in a server log's access lines; health checks excluded."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '"' in line and " /api/" in line)


def server_pid(root: Path) -> int | None:
    """The pid in ``root/mlflow.pid`` if that process is this root's MLflow server; a stale PID file is removed."""
    pid_file = root / "mlflow.pid"
    if not pid_file.is_file():
        return None
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if find_process(pid, str(root / "mlflow" / "artifacts")):
            return pid
    pid_file.unlink(missing_ok=True)
    logger.info("removed the stale PID file %s (it named no MLflow server of this root)", pid_file)
    return None


def _server_port(pid: int) -> int:
    command = psutil.Process(pid).cmdline()
    return int(command[command.index("--port") + 1])


def _answers(pid: int) -> bool:
    port = _server_port(pid)
    with contextlib.suppress(requests.RequestException):
        return listens(pid, port) and requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok
    return False


def _usage(pid: int, root: Path) -> str:
    url = f"http://127.0.0.1:{_server_port(pid)}"
    return (f"MLflow (basic auth) on PostgreSQL at {url} (pid {pid}); log {root / 'mlflow' / 'server.log'}. Use it "
            f"with:\n  export MLFLOW_TRACKING_URI={url} MLFLOW_TRACKING_USERNAME={ADMIN}\n"
            f"  export MLFLOW_TRACKING_PASSWORD=$(grep ^MLFLOW_AUTH_ADMIN_PASSWORD= '{root / 'secrets.env'}' | cut -d= -f2-)"
            "\nStop it with `make tracking-server-stop`.")  # fmt: skip


def start(root: Path, port: int, db_port: int) -> int:
    """Start this root's PostgreSQL and MLflow unless they run; a running server is reported, not doubled."""
    pid = server_pid(root)
    if pid is not None and _answers(pid):
        Postgres(root, port=db_port).start()  # back after a database crash
        logger.info("already running. %s", _usage(pid, root))
        return 0
    if pid is not None:  # this root's server, hung: replace it
        logger.info("the MLflow server (pid %d) does not answer; restarting it", pid)
        terminate_group(pid)
    _refuse_busy(port, "--port")  # before anything is created or started
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    postgres = Postgres(root, port=db_port)
    was_running = postgres.running_pid() is not None
    try:
        postgres.start()
        values = read_secrets(root)
        server = MlflowServer(root / "mlflow", postgres.uri(), auth_database_uri=postgres.uri(AUTH_DATABASE),
                              admin_password=values["MLFLOW_AUTH_ADMIN_PASSWORD"],
                              secret_key=values["MLFLOW_FLASK_SERVER_SECRET_KEY"], port=port, workers=2)  # fmt: skip
        server.start()
    except BaseException:
        if not was_running:
            postgres.stop()  # nothing is left running after a failed start
        raise
    write_private(root / "mlflow.pid", str(server.process.pid))
    logger.info(_usage(server.process.pid, root))
    return 0


def stop(root: Path) -> int:
    """Stop this root's MLflow server and PostgreSQL, signalling only processes verified to be them."""
    if not root.is_dir():
        logger.info("not running (no tracking server data in %s)", root)
        return 0
    stopped = []
    pid = server_pid(root)
    if pid is not None:
        terminate_group(pid)
        (root / "mlflow.pid").unlink(missing_ok=True)
        stopped.append(f"MLflow (pid {pid})")
    if Postgres(root).stop():
        stopped.append("PostgreSQL")
    if stopped:
        logger.info("stopped %s; data kept in %s", " and ".join(stopped), root)
    else:
        logger.info("not running (%s)", root)
    return 0


def status(root: Path) -> int:
    """Exit 0 when this root's MLflow server runs and answers, else 1."""
    pid = server_pid(root) if root.is_dir() else None
    if pid is not None and _answers(pid):
        database = "running" if Postgres(root).running_pid() else "NOT running"
        logger.info("running at http://127.0.0.1:%d (pid %d; PostgreSQL %s); data in %s", _server_port(pid), pid,
                    database, root)  # fmt: skip
        return 0
    logger.info("not running (%s)", root)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``start``: PostgreSQL + MLflow (basic auth) in the background, ``stop``: both, ``status``."""
    parser = argparse.ArgumentParser(
        prog="python -m unet3plus.tracking_server",
        description="A local team tracking server: PostgreSQL + `mlflow server --app-name basic-auth`, data and "
        "generated secrets under --root (private to your account: 0700/0600). `start` prints the MLFLOW_TRACKING_* "
        "variables to export; starting a running server only reports it; `stop` stops only this root's servers.",
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--root", type=Path, default=Path(".tracking"), help="data folder (default: .tracking)")
    parser.add_argument("--port", type=int, default=5000, help="MLflow port on 127.0.0.1 (default: 5000)")
    parser.add_argument("--db-port", type=int, default=5433, help="PostgreSQL port on 127.0.0.1 (default: 5433)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root.resolve()
    try:
        if args.action == "start":
            return start(root, args.port, args.db_port)
        return stop(root) if args.action == "stop" else status(root)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
