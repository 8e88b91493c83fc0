"""Team mode: a PostgreSQL cluster and an MLflow tracking server on it, both under the state dir.

`make team-up` / `make team-down` and the team-mode tests use it. PostgreSQL is the Debian (or any) build's own
`initdb` + `pg_ctl`, in a folder of ours: no system service, trust auth on loopback only. MLflow is `mlflow server`
with its runs and registry in PostgreSQL and proxied artifacts (`--artifacts-destination`), so clients log to
`mlflow-artifacts:/` URIs that the server stores and serves, never to paths that exist only on the client. `up`
writes `team.env` for users to `source`: it exports LLMHOST_STORE_URL and MLFLOW_TRACKING_URI.

    python -m tasks.core.team up [--root DIR]      # prints what to source
    python -m tasks.core.team down [--root DIR]
    python -m tasks.core.team status [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.core.errors import ConfigError, ServingError
from tasks.core.procs import free_port, group_alive, kill_group
from tasks.core.settings import get_settings

DB_USER = "llmhost"
DATABASES = ("llmhost", "mlflow")


def pg_bin(name: str) -> Path | None:
    """A PostgreSQL server binary: on PATH, else the newest of Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return versions[-1] if versions else None


def postgres_available() -> bool:
    return all(pg_bin(n) is not None for n in ("initdb", "pg_ctl", "postgres"))


def service_user() -> str | None:
    """Who runs PostgreSQL: ourselves, or when we are root (initdb and postgres refuse root) the package's
    `postgres` user, else `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ServingError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


@dataclass
class TeamState:
    """What `up` started; kept in team.json so `down`, `status` and a second `up` find it."""

    pg_port: int
    mlflow_port: int
    pgdata: str
    artifacts: str
    mlflow_pid: int | None = None

    @property
    def store_url(self) -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.pg_port}/llmhost"

    @property
    def mlflow_backend_url(self) -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.pg_port}/mlflow"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"


class TeamServices:
    """Starts and stops the team's PostgreSQL and MLflow server; everything lives under `root`.

    `pg_root` (default `root/pg`) holds the cluster and its log. Running as root, PostgreSQL runs as another user
    (`service_user`), who must be able to reach `pg_root`: a folder under a root-only tmp dir will not do.
    """

    def __init__(self, root: Path, *, pg_root: Path | None = None, startup_timeout_s: float = 120.0) -> None:
        self.root = Path(root).absolute()
        self.pg_root = Path(pg_root).absolute() if pg_root else self.root / "pg"
        self.pgdata = self.pg_root / "data"
        self.artifacts = self.root / "mlartifacts"
        self.state_file = self.root / "team.json"
        self.env_file = self.root / "team.env"
        self.mlflow_log = self.root / "mlflow.log"
        self.startup_timeout_s = startup_timeout_s
        self.user = service_user()

    # ------------------------------------------------------------------------------------------------ state

    def state(self) -> TeamState | None:
        if not self.state_file.exists():
            return None
        return TeamState(**json.loads(self.state_file.read_text()))

    def _save(self, st: TeamState) -> None:
        self.state_file.write_text(json.dumps(asdict(st), indent=2))
        self.env_file.write_text(
            "# Team mode (make team-up): `source` this so llmhost uses the team's PostgreSQL store and MLflow server.\n"
            f"export LLMHOST_STORE_URL={st.store_url}\n"
            f"export MLFLOW_TRACKING_URI={st.tracking_uri}\n"
        )

    # ------------------------------------------------------------------------------------------------ PostgreSQL

    def _as_service_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else argv

    def _pg(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = pg_bin(name)
        if binary is None:
            raise ServingError(f"PostgreSQL's {name} is not installed; apt-get install postgresql (any major "
                               "version) or put its bin folder on PATH")
        # Output to a file, not a pipe: `pg_ctl start` leaves a daemon that would hold a pipe open.
        out = self.root / f"{name}.out"
        with out.open("w") as f:
            proc = subprocess.run(self._as_service_user([str(binary), *args]), stdout=f, stderr=subprocess.STDOUT,
                                  text=True, check=False, timeout=self.startup_timeout_s)
        if check and proc.returncode != 0:
            raise ServingError(f"{name} {' '.join(args[:2])} failed (exit {proc.returncode}): "
                               f"{_tail(out)} {_tail(self.pg_root / 'postgres.log')}".strip())
        return proc

    def _prepare_pg_root(self) -> None:
        self.pg_root.mkdir(parents=True, exist_ok=True)
        if not self.user:
            return
        pw = pwd.getpwnam(self.user)
        os.chown(self.pg_root, pw.pw_uid, pw.pw_gid)
        reach = subprocess.run(["runuser", "-u", self.user, "--", "test", "-w", str(self.pg_root)], check=False)
        if reach.returncode != 0:
            raise ConfigError("pg_root", str(self.pg_root), f"running as root, PostgreSQL runs as user '{self.user}', "
                              "who cannot reach this folder; make its parent folders traversable (chmod o+x) or "
                              "pass --pg-root with a folder under /tmp")

    def pg_running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists() and self._pg("pg_ctl", "status", "-D", str(self.pgdata),
                                                                        check=False).returncode == 0

    def _start_postgres(self, port: int) -> None:
        self._prepare_pg_root()
        if not (self.pgdata / "PG_VERSION").exists():
            self._pg("initdb", "-D", str(self.pgdata), "-U", DB_USER, "--auth=trust", "-E", "UTF8")
        # Loopback TCP only and no unix socket: its default folder (/var/run/postgresql) may not exist or be ours.
        self._pg("pg_ctl", "start", "-w", "-t", str(int(self.startup_timeout_s)), "-D", str(self.pgdata),
                 "-l", str(self.pg_root / "postgres.log"), "-o", f"-p {port} -h 127.0.0.1 -k ''")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="postgres", autocommit=True) as c:
            have = {r[0] for r in c.execute("SELECT datname FROM pg_database")}
            for db in DATABASES:
                if db not in have:
                    c.execute(f'CREATE DATABASE "{db}"')

    def create_database(self, name: str) -> str:
        """A fresh, empty database on the running cluster (tests: one per test); returns its SQLAlchemy URL."""
        import psycopg

        st = self._require_state()
        with psycopg.connect(host="127.0.0.1", port=st.pg_port, user=DB_USER, dbname="postgres",
                             autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{st.pg_port}/{name}"

    # ------------------------------------------------------------------------------------------------ MLflow

    def _start_mlflow(self, st: TeamState) -> int:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the server is the tracking URI, not a client
            env.pop(var, None)
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(st.mlflow_port),
                "--backend-store-uri", st.mlflow_backend_url, "--artifacts-destination", str(self.artifacts),
                "--workers", "1"]
        with self.mlflow_log.open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServingError(f"mlflow server exited with {proc.returncode} while starting; "
                                   f"see {self.mlflow_log}: {_tail(self.mlflow_log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{st.tracking_uri}/health", timeout=2).status_code == 200:
                    return proc.pid
            time.sleep(0.25)
        kill_group(proc.pid)
        raise ServingError(f"mlflow server did not answer /health within {self.startup_timeout_s:.0f} s; "
                           f"see {self.mlflow_log}")

    def mlflow_running(self, st: TeamState) -> bool:
        return st.mlflow_pid is not None and group_alive(st.mlflow_pid)

    # ------------------------------------------------------------------------------------------------ up/down

    def up(self, *, pg_port: int | None = None, mlflow_port: int | None = None, with_mlflow: bool = True) -> TeamState:
        """Start whatever is not running (idempotent); a restarted team keeps its ports, so team.env holds.

        `with_mlflow=False` starts PostgreSQL alone (the store needs nothing else; MLflow's start costs ~15 s)."""
        self.root.mkdir(parents=True, exist_ok=True)
        old = self.state()
        st = TeamState(pg_port=pg_port or (old.pg_port if old else free_port()),
                       mlflow_port=mlflow_port or (old.mlflow_port if old else free_port()),
                       pgdata=str(self.pgdata), artifacts=str(self.artifacts),
                       mlflow_pid=old.mlflow_pid if old else None)
        if old and (old.pg_port != st.pg_port or old.mlflow_port != st.mlflow_port):
            self.down()  # ports changed: restart both on the new ones
            st.mlflow_pid = None
        try:
            if not self.pg_running():
                self._start_postgres(st.pg_port)
            if with_mlflow and not self.mlflow_running(st):
                st.mlflow_pid = self._start_mlflow(st)
        except BaseException:
            self._save(st)  # so `down` can stop what did start
            raise
        self._save(st)
        return st

    def stop_mlflow(self) -> bool:
        """Stop the MLflow server alone; True if it was running."""
        st = self.state()
        if not (st and st.mlflow_pid and group_alive(st.mlflow_pid)):
            return False
        kill_group(st.mlflow_pid)
        st.mlflow_pid = None
        self._save(st)
        return True

    def down(self) -> list[str]:
        """Stop the MLflow server and PostgreSQL (their data stays); returns what was stopped."""
        stopped = ["mlflow"] if self.stop_mlflow() else []
        if self.pgdata.exists() and self.pg_running():
            self._pg("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.pgdata))
            stopped.append("postgresql")
        return stopped

    def _require_state(self) -> TeamState:
        st = self.state()
        if st is None:
            raise ServingError(f"no team services under {self.root}; run `make team-up` first")
        return st


def _tail(path: Path, lines: int = 3) -> str:
    if not path.exists():
        return ""
    return " | ".join(line.strip() for line in path.read_text(errors="replace").splitlines()[-lines:] if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=None, help="Where it all lives (default: $LLMHOST_HOME/team).")
    parser.add_argument("--pg-root", type=Path, default=None, help="PostgreSQL's folder (default: ROOT/pg).")
    parser.add_argument("--pg-port", type=int, default=None, help="Default: the last one used, else a free one.")
    parser.add_argument("--mlflow-port", type=int, default=None, help="Default: the last one used, else a free one.")
    ns = parser.parse_args(argv)
    team = TeamServices(ns.root or get_settings().home_abs / "team", pg_root=ns.pg_root)
    try:
        if ns.action == "up":
            st = team.up(pg_port=ns.pg_port, mlflow_port=ns.mlflow_port)
            print(f"Team mode up: PostgreSQL on 127.0.0.1:{st.pg_port}, MLflow server {st.tracking_uri} "
                  f"(artifacts in {st.artifacts}).\nUse it with:  source {team.env_file}")
        elif ns.action == "down":
            stopped = team.down()
            print(f"Team mode under {team.root}: stopped {', '.join(stopped) or 'nothing (not running)'}; "
                  "the data stays there")
        else:
            known = team.state()
            if known is None:
                print(f"Team mode: never started under {team.root}")
                return 1
            pg, ml = team.pg_running(), team.mlflow_running(known)
            print(f"PostgreSQL 127.0.0.1:{known.pg_port}: {'up' if pg else 'down'}; "
                  f"MLflow {known.tracking_uri}: {'up' if ml else 'down'}; env: {team.env_file}")
            return 0 if pg and ml else 1
    except (ServingError, ConfigError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
