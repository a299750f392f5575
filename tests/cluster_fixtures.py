"""Session fixtures for the `cluster` tests: a single-node SLURM cluster (munged, slurmctld, slurmd) and a team
MLflow server (`make server`) on a PostgreSQL database, all in temp dirs on loopback, torn down at the end.

Without the Debian packages the tests skip with the install command; CI sets MNISTLAB_REQUIRE_CLUSTER=1,
which turns that skip into a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, PROJECT_ROOT, cli_env, free_port

INSTALL = "apt-get update && apt-get install -y slurm-wlm munge postgresql   (as root)"
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
PG_USER = "postgres"  # Debian's postgresql package creates it; PostgreSQL refuses to run as root


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def tool(name: str) -> str:
    """A SLURM/munge program: on PATH, else in /usr/sbin (not on a non-root PATH)."""
    return shutil.which(name) or str(Path("/usr/sbin", name))


def missing() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    gone = [t for t in SLURM_TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if _pg_bin() is None:
        gone.append("postgresql (initdb)")
    if gone:
        return f"missing {', '.join(gone)}; install with: {INSTALL}"
    if os.geteuid() != 0:
        return "slurmd and munged must start as root (run the cluster tests as root, as CI does)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is missing: pip install -e '.[postgres]'"
    return None


def require_cluster() -> None:
    reason = missing()
    if reason is None:
        return
    if os.environ.get("MNISTLAB_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"cluster tests required (MNISTLAB_REQUIRE_CLUSTER=1) but cannot run: {reason}", pytrace=False)
    pytest.skip(f"cluster tests skipped: {reason}")


def wait_for(check, what: str, timeout: float = 60, procs=()) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        for p, log in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: exited {p.returncode}\n{Path(log).read_text()[-3000:] if Path(log).exists() else ''}")
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout}s")
        time.sleep(0.3)


class Daemons:
    """The processes this session started, each in its own session, stopped in reverse order (only these PIDs)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], log: Path, **kwargs) -> subprocess.Popen:
        out = open(log, "ab")
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        out.close()
        self.procs.append((name, p))
        return p

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


class Slurm:
    """A one-node SLURM cluster: `env` (SLURM_CONF) for every client command, `run` for squeue/scontrol & co."""

    def __init__(self, conf: Path, node: str):
        self.conf, self.node = conf, node
        self.env = {"SLURM_CONF": str(conf)}

    def run(self, *args: str, check: bool = True) -> str:
        env = {**os.environ, **self.env}
        return subprocess.run(list(args), env=env, capture_output=True, text=True, check=check, timeout=60).stdout

    def diagnose(self) -> str:
        """What a failed cluster test prints: every job with its state and reason, the node's state and reason,
        the last lines of slurmctld's and slurmd's logs."""
        d = self.conf.parent
        out = [self.run("squeue", "-a", "-r", "-t", "all", "-o", "%i %T %r %M %N", check=False),
               self.run("sinfo", "-N", "-o", "%N %T %C %e %E", check=False)]
        out += [f"--- {name}:\n" + "\n".join((d / name).read_text(errors="replace").splitlines()[-25:])
                for name in ("slurmctld.log", "slurmd.log") if (d / name).exists()]
        return "\n".join(out)

    def jobs(self) -> dict[str, str]:
        """{array task id "123_0": state} of every job slurmctld still knows (finished ones for MinJobAge)."""
        out = self.run("squeue", "-h", "-r", "-t", "all", "-o", "%i %T")
        return dict(line.split() for line in out.splitlines() if line.strip())


def _write_slurm_conf(d: Path, node: str, munge_socket: Path) -> Path:
    import psutil

    mem_mb = int(psutil.virtual_memory().total / 2**20 * 0.9)
    cpus = os.cpu_count() or 2
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=mnistlab-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=20
CredType=cred/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@pytest.fixture(scope="session")
def daemons():
    d = Daemons()
    yield d
    d.stop_all()


@pytest.fixture(scope="session")
def slurm(daemons, tmp_path_factory) -> Slurm:
    """munged with a fresh key, slurmctld and slurmd on 127.0.0.1; config and state in a temp dir."""
    require_cluster()
    d = tmp_path_factory.mktemp("slurm")
    munge = d / "munge"
    munge.mkdir(mode=0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = munge / "munge.socket"
    munged = daemons.start("munged", [
        tool("munged"), "-F", "--force", f"--socket={sock}", f"--key-file={key}", f"--log-file={munge / 'munged.log'}",
        f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}"], munge / "out.log")
    wait_for(sock.exists, "munged", 30, [(munged, munge / "munged.log")])

    node = socket.gethostname().split(".")[0]
    conf = _write_slurm_conf(d, node, sock)
    cluster = Slurm(conf, node)
    env = {**os.environ, **cluster.env}
    ctld = daemons.start("slurmctld", [tool("slurmctld"), "-D", "-i", "-f", str(conf)], d / "slurmctld.out", env=env)
    wait_for(lambda: "UP" in cluster.run("scontrol", "ping", check=False), "slurmctld", 60, [(ctld, d / "slurmctld.log")])
    slurmd = daemons.start("slurmd", [tool("slurmd"), "-D", "-f", str(conf), "-N", node], d / "slurmd.out", env=env)
    wait_for(lambda: cluster.run("sinfo", "-h", "-o", "%T").strip() in ("idle", "mixed"), "slurmd", 60,
             [(slurmd, d / "slurmd.log")])
    yield cluster
    # jobs a failed test left behind run under slurmstepd, outside slurmd's process group: cancel them first
    cluster.run("scancel", "--user", str(os.getuid()), check=False)
    wait_for(lambda: not [s for s in cluster.jobs().values() if s in ("RUNNING", "COMPLETING")], "job cleanup", 60)


@pytest.fixture(scope="session")
def postgres_uri(daemons) -> str:
    """A PostgreSQL cluster run by the unprivileged `postgres` user, on a free loopback port; returns its URI."""
    require_cluster()
    import pwd

    pg = pwd.getpwnam(PG_USER)
    base = Path(tempfile.mkdtemp(prefix="mnistlab-pg-"))
    os.chown(base, pg.pw_uid, pg.pw_gid)
    as_pg = {"user": pg.pw_uid, "group": pg.pw_gid, "extra_groups": [], "cwd": base}
    data, port = base / "data", free_port()
    subprocess.run([str(_pg_bin() / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, **as_pg)
    proc = daemons.start("postgres", [str(_pg_bin() / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                                      "-k", str(base)], base / "postgres.log", **as_pg)
    import psycopg

    def ready():
        psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres").close()
        return True

    wait_for(ready, "postgres", 60, [(proc, base / "postgres.log")])
    conn = psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres", autocommit=True)
    conn.cursor().execute("CREATE DATABASE mlflow")
    conn.close()
    yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    shutil.rmtree(base, ignore_errors=True)


class Server(str):
    """The server's URL, knowing where it stores the artifacts it proxies."""

    artifacts_dir: Path


@pytest.fixture(scope="session")
def mlflow_server(daemons, postgres_uri, tmp_path_factory) -> Server:
    """`make server` as the README gives it: mlflow on the PostgreSQL store, artifacts proxied; returns its URL."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = d / "server.log"
    proc = daemons.start("mlflow server", [
        "make", "-o", "setup", "server", f"VENV={BIN.parent}", f"BACKEND_STORE_URI={postgres_uri}",
        f"ARTIFACTS_DIR={d / 'artifacts'}", f"SERVER_PORT={port}"], log, cwd=PROJECT_ROOT, env=cli_env())
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, "mlflow server", 180, [(proc, log)])
    server = Server(url)
    server.artifacts_dir = d / "artifacts"
    return server
