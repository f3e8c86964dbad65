"""A real two-node Ray cluster on the loopback interface, started and used the way a user would
(README "A real cluster"): ``ray get-auth-token --generate`` makes the token, the README's own
``ray start --head`` and ``ray start --address`` lines (read from the README, plus only the
same-machine flags it lists: a temp dir and ports of each node's own, 1 CPU each) run with
``RAY_AUTH_MODE=token``, and the jobs go through ``ray job submit`` to the dashboard on 127.0.0.1:

1. ingest of three sample videos (pipelines/samples/talking_heads.py); the second node is killed (SIGKILL of
   its whole process group: a lost machine) while the job runs. The job still finishes and every
   video is accounted for in the manifest, as ``ok`` or ``failed`` (an infrastructure failure is
   never recorded as a bad file); Ray's state API shows the job's tasks ran on both nodes;
2. a replacement second node joins, and the same ingest command again finishes what is left
   (resume): every video ``ok``, each with its frame file;
3. ``train.py`` refusals, each in seconds and before any worker: 0.75-CPU workers that leave no
   node a CPU for the reader's tasks (the message names the resource and the figures), and a
   ``--working-dir`` job whose default result paths would land in Ray's copy of the checkout;
4. ``train.py`` (tiny preset, stages 1 and 2, 2 steps each, default placement and data loader):
   DDP world size 2 with one worker on each node, read from Ray's state API (the workers'
   actors and their nodes), one ``[train]`` line per event, checkpoints and registered versions
   where the job's settings say;
5. ``evaluate.py`` on the stage-2 version (``models:/loopy@stage2``): metrics in the JSON.

A client without the token is refused (HTTP 401). Everything listens on and talks to loopback
only: the head's node address is 127.0.0.2 (``ray start`` rewrites 127.0.0.1 to the machine's
network address, but keeps any other 127/8 address; Linux routes all of 127.0.0.0/8 to ``lo``),
the second node finds its own address from the head's (127.0.0.1), the dashboard is bound to
127.0.0.1, and every port is chosen free at run time. The temp dirs are a folder under RAY_TMPDIR,
reached through a short /tmp alias when the path is long (Ray's Unix sockets live in them and a
socket path must stay under 108 bytes: core.ray_runtime.socket_safe_temp_dir). Teardown kills exactly the processes this module started (the
``ray start --block`` process groups, then anything left whose command line names our temp dir,
by pid); never ``ray stop``, which stops every Ray of the user on the machine (the suite's own
embedded Ray included).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and the `python` the jobs run with
HEAD_IP = "127.0.0.2"
DASHBOARD_HOST = "127.0.0.1"
OBJECT_STORE_BYTES = 200 * 1024 * 1024
START_TIMEOUT_S = 180  # per node; Ray itself gives a raylet 30 s to register, retried below
JOB_TIMEOUT_S = 900
STAGES = ("Analyzer", "AudioFeature", "Vae", "DecodeStage")  # task names of the ingest stages
README = ROOT / "README.md"
# what the test adds to the README's node commands, each listed in the README: a node sharing this
# machine needs its own temp dir and ports; 1-CPU nodes as in issue 27; small object store;
# foreground nodes the test can kill
SAME_HOST_FLAGS = ("--temp-dir", "--ray-client-server-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                   "--node-manager-port", "--object-manager-port", "--num-cpus", "--object-store-memory",
                   "--disable-usage-stats", "--block")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="multi-node Ray on one machine needs Linux (127.0.0.0/8 on lo)"),
    pytest.mark.skipif(not (BIN / "ray").exists(), reason="the ray CLI is not installed in this venv"),
]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while chosen, so distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def readme_cluster_section() -> str:
    text = README.read_text()
    start = text.index("### A real cluster")
    return text[start:text.index("\n## ", start)]


def readme_node_commands() -> dict[str, list[str]]:
    """The README's ``ray start`` lines: {"head": args, "node": args} (after ``ray start``)."""
    lines = [ln.strip() for ln in readme_cluster_section().splitlines() if ln.strip().startswith("ray start ")]
    heads = [shlex.split(ln)[2:] for ln in lines if "--head" in ln]
    nodes = [shlex.split(ln)[2:] for ln in lines if "--address" in ln]
    assert len(heads) == 1 and len(nodes) == 1, f"README: expected one head and one node command, got {lines}"
    return {"head": heads[0], "node": nodes[0]}


def from_readme(args: list[str], gcs_port: int, dashboard_port: int) -> list[str]:
    """The README's arguments with its placeholders (HEAD_IP, ports 6379 and 8265) filled in."""
    values = {"HEAD_IP": HEAD_IP, "HEAD_IP:6379": f"{HEAD_IP}:{gcs_port}", "6379": str(gcs_port),
              "8265": str(dashboard_port)}
    return [values.get(a, a) for a in args]


def short_temp_root() -> tuple[Path, Path]:
    """(the folder the cluster uses, the real folder to delete): a fresh folder under RAY_TMPDIR (the
    work tree in ``make test``), through a short /tmp alias when Ray's socket paths under it and its
    node sub-folders (``node2_N``) would be too long."""
    from core.ray_runtime import socket_safe_temp_dir

    base = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    real = Path(tempfile.mkdtemp(prefix="mn-", dir=base))
    return socket_safe_temp_dir(real, reserve=len("/node2_99")), real


@dataclass
class RayNode:
    """One ``ray start --block`` process (its own process group) and its log file."""

    name: str
    proc: subprocess.Popen
    log: Path
    temp_dir: Path

    def kill(self) -> None:
        """SIGKILL the node's whole process group (raylet, workers, agents): a lost machine."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@dataclass
class Cluster:
    root: Path
    env: dict
    token: str
    gcs_port: int
    dashboard_port: int
    nodes: list = field(default_factory=list)
    commands: list = field(default_factory=list)  # (README arguments, what the test added) per start

    @property
    def dashboard(self) -> str:
        return f"http://{DASHBOARD_HOST}:{self.dashboard_port}"

    # --- HTTP (the dashboard's REST API: jobs and the state API) ---------------------------------

    def get(self, path: str, token: bool = True, timeout: float = 30):
        request = urllib.request.Request(self.dashboard + path)
        if token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def state(self, kind: str, **filters) -> list[dict]:
        """Ray state API rows (``nodes``, ``tasks``, ...) with equality filters."""
        query = "limit=10000&detail=1"
        for key, value in filters.items():
            query += f"&filter_keys={key}&filter_predicates=%3D&filter_values={value}"
        return self.get(f"/api/v0/{kind}?{query}")["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    # --- the CLI, as a user runs it ------------------------------------------------------------

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start_node(self, name: str, readme_args: list[str], same_host: list[str]) -> RayNode:
        """``ray start`` with the README's arguments plus ``same_host`` ones, its own temp dir,
        ``--block``; returns once the node is up. Retried up to three times when Ray gives up
        waiting for its raylet (30 s, hard-coded) on a loaded machine."""
        for _ in range(4):
            temp_dir = self.root / f"{name}{len(self.nodes)}"  # every start: a fresh temp dir
            temp_dir.mkdir()
            log = self.root / f"{name}{len(self.nodes)}.log"
            added = ["--block", *same_host, "--temp-dir", str(temp_dir), "--object-store-memory",
                     str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
            self.commands.append((readme_args, added))
            with open(log, "w") as out:
                proc = subprocess.Popen([str(BIN / "ray"), "start", *readme_args, *added],
                                        env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            node = RayNode(name, proc, log, temp_dir)
            self.nodes.append(node)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace")
                if "Ray runtime started" in text:
                    return node
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
            node.kill()
            if "timed out during startup" not in log.read_text(errors="replace"):
                break
        pytest.fail(f"ray start ({name}) did not come up; {log}:\n{log.read_text(errors='replace')[-3000:]}")

    def add_second_node(self) -> RayNode:
        agent, agent_grpc, env_agent, metrics, manager, objects = free_ports(6)
        before = {n["node_id"] for n in self.alive_nodes()}
        readme_args = from_readme(readme_node_commands()["node"], self.gcs_port, self.dashboard_port)
        node = self.start_node("node2_", readme_args, [
            "--num-cpus", "1", "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
            str(agent_grpc), "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics),
            "--node-manager-port", str(manager), "--object-manager-port", str(objects)])
        wait_for(lambda: len({n["node_id"] for n in self.alive_nodes()} - before) == 1, 120, "node 2 to register")
        return node

    def submit(self, submission_id: str, *entrypoint: str, submit_args: tuple = ()) -> subprocess.Popen:
        """``ray job submit`` (blocking: it tails the job's logs and exits with its status)."""
        return subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", self.dashboard,
                                 "--submission-id", submission_id, *submit_args, "--", *entrypoint],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish_job(self, submission_id: str, *entrypoint: str, submit_args: tuple = ()) -> tuple[int, str]:
        """(exit code of ``ray job submit``, its output) once the job ended."""
        proc = self.submit(submission_id, *entrypoint, submit_args=submit_args)
        try:
            out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"job {submission_id} did not finish in {JOB_TIMEOUT_S} s:\n{out[-5000:]}")
        return proc.returncode, out

    def run_job(self, submission_id: str, *entrypoint: str) -> str:
        rc, out = self.finish_job(submission_id, *entrypoint)
        assert rc == 0, f"job {submission_id} failed:\n{out[-5000:]}"
        assert self.get(f"/api/jobs/{submission_id}")["status"] == "SUCCEEDED"
        return out

    def job_actors(self, submission_id: str, class_name: str) -> list[dict]:
        """Ray's state API: the actors of class ``class_name`` the job created (alive or dead)."""
        job_id = self.get(f"/api/jobs/{submission_id}")["job_id"]
        return [a for a in self.state("actors", job_id=job_id) if a["class_name"] == class_name]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            pass  # the dashboard is still starting
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_processes_under(root: Path) -> None:
    """Kill, by pid, whatever process still names ``root`` on its command line (ours only)."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(root) in part for part in proc.info["cmdline"] or ()):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=15)


@pytest.fixture(scope="module")
def cluster():
    root, real_root = short_temp_root()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # The token, made as the README says; a HOME of our own keeps the user's ~/.ray untouched.
    home = root / "home"
    home.mkdir()
    made = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    token_file = home / ".ray" / "auth_token"
    assert made.returncode == 0 and token_file.is_file(), made.stderr
    token = made.stdout.strip()
    assert token == token_file.read_text().strip() and len(token) >= 32
    token_file.chmod(0o600)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    env.pop("RAY_AUTH_TOKEN", None)
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, manager, objects = free_ports(9)
    c = Cluster(root, env, token, gcs, dash)
    try:
        c.start_node("head", from_readme(readme_node_commands()["head"], gcs, dash), [
            "--num-cpus", "1", "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
            "--metrics-export-port", str(metrics), "--node-manager-port", str(manager),
            "--object-manager-port", str(objects)])
        wait_for(lambda: c.get("/api/version")["ray_version"], 120, "the dashboard's job API")
        c.add_second_node()
        yield c
    finally:
        for node in c.nodes:
            node.kill()
        stop_processes_under(root)
        shutil.rmtree(real_root, ignore_errors=True)
        if root != real_root:
            root.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def samples(cluster) -> list[Path]:
    from pipelines.samples.talking_heads import SAMPLE_SPECS, generate_samples

    return generate_samples(cluster.root / "samples", seconds=6.0, specs=SAMPLE_SPECS[:3])


def job_overrides(root: Path) -> list[str]:
    """Keep every file a job writes under the test's folder (tiny weights, MLflow, checkpoints)."""
    return [f"weights.tiny_dir={root}/tiny_weights", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
            f"tracking.artifact_root={root}/mlruns", f"train.storage_path={root}/ray_results"]


def ingest_command(root: Path, samples_dir: Path, out: Path) -> list[str]:
    return ["python", str(ROOT / "pipelines" / "ingest.py"), "--input", str(samples_dir), "--output", str(out),
            *job_overrides(root)]


def manifest(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "videos.parquet").to_pylist()
    return {Path(r["source"]).name: r for r in rows}


@pytest.fixture(scope="module")
def ingest_with_node_loss(cluster, samples):
    """The ingest job, with node 2 killed (while the job runs) once one of its ingest-stage tasks
    has finished there (the stages are spread over both nodes)."""
    out = cluster.root / "ingested"
    proc = cluster.submit("ingest-1", *ingest_command(cluster.root, samples[0].parent, out))
    node2 = [n for n in cluster.nodes if n.name.startswith("node2")][-1]
    node2_id = {n["node_id"] for n in cluster.alive_nodes() if n.get("resources_total", {}).get("node2")}
    done_at_kill = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # kill node 2 once one of its ingest-stage tasks has finished and the job still runs
            job = cluster.get("/api/jobs/ingest-1")
            tasks = cluster.state("tasks", job_id=job["job_id"]) if job.get("job_id") else []
            on_node2 = [t for t in tasks if t.get("node_id") in node2_id and t["state"] == "FINISHED"
                        and any(s in t["name"] for s in STAGES)]
            if on_node2 and job["status"] == "RUNNING":
                logs = cluster.get("/api/jobs/ingest-1/logs")["logs"]
                done_at_kill = max([int(k) for k in re.findall(r"\[ingest\] (\d+)/3 done", logs)] or [0])
                node2.kill()
                break
        except (urllib.error.URLError, OSError, KeyError, ValueError, TypeError):
            pass
        time.sleep(0.5)
    try:
        out_text, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out_text, _ = proc.communicate()
        pytest.fail(f"the ingest job did not finish after node 2 was lost:\n{out_text[-5000:]}")
    job = cluster.get("/api/jobs/ingest-1")
    return {"out": out, "rc": proc.returncode, "log": out_text, "job": job, "done_at_kill": done_at_kill,
            "node2_ids": node2_id, "samples": samples}


def test_nodes_run_the_readme_commands(cluster):
    """Each ``ray start`` was the README's line with its placeholders filled, plus only flags the
    README lists for two nodes on one machine."""
    section = readme_cluster_section()
    for flag in SAME_HOST_FLAGS:
        assert f"`{flag}" in section, f"README does not list {flag}"
    readme = readme_node_commands()
    assert HEAD_IP not in " ".join(readme["head"] + readme["node"])  # placeholders, not the test's values
    assert "--dashboard-host" in readme["head"] and "127.0.0.1" in readme["head"]
    for args, added in cluster.commands:
        assert args in (from_readme(readme["head"], cluster.gcs_port, cluster.dashboard_port),
                        from_readme(readme["node"], cluster.gcs_port, cluster.dashboard_port))
        flags = {a for a in added if a.startswith("--")}
        assert flags <= set(SAME_HOST_FLAGS), flags - set(SAME_HOST_FLAGS)


def test_client_without_the_token_is_refused(cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        cluster.get("/api/jobs/", token=False)
    assert refused.value.code == 401
    assert isinstance(cluster.get("/api/jobs/"), list)
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2 and {n["node_ip"] for n in nodes} <= {"127.0.0.1", HEAD_IP}, nodes


def test_ingest_survives_losing_node2_and_used_both_nodes(cluster, ingest_with_node_loss):
    run = ingest_with_node_loss
    assert run["done_at_kill"] is not None, f"the job ended before node 2 could be killed:\n{run['log'][-3000:]}"
    assert run["done_at_kill"] < 3, "node 2 was killed after the last video: nothing left to lose"
    assert run["rc"] == 0 and run["job"]["status"] == "SUCCEEDED", run["log"][-5000:]
    rows = manifest(run["out"])
    assert set(rows) == {p.name for p in run["samples"]}, "a video is missing from the manifest"
    statuses = {name: r["status"] for name, r in rows.items()}
    assert set(statuses.values()) <= {"ok", "failed"}, f"a lost node recorded as a bad file: {rows}"
    for name, r in rows.items():
        if r["status"] == "failed":
            assert r["reason"], f"{name}: failed without a reason"
    print("statuses after losing node 2:", statuses)
    # the progress lines count failed videos as failed, not as rejected
    counts = re.findall(r"\[ingest\] \d+/3 done \((\d+) rejected\)(?:, (\d+) failed)?:", run["log"])
    assert counts, run["log"][-3000:]
    rejected, failed = counts[-1]
    assert int(rejected) == sum(s == "rejected" for s in statuses.values())
    assert int(failed or 0) == sum(s == "failed" for s in statuses.values()), counts
    # the job's tasks ran on both nodes (Ray's state API keeps node 2's finished tasks)
    tasks = cluster.state("tasks", job_id=run["job"]["job_id"])
    nodes_used = {t["node_id"] for t in tasks if t["state"] == "FINISHED" and t.get("node_id")}
    stage_nodes = {t["node_id"] for t in tasks if t.get("node_id") and t["state"] == "FINISHED"
                   and any(s in t["name"] for s in STAGES)}
    assert len(nodes_used) == 2 and run["node2_ids"] <= nodes_used, f"tasks ran on {nodes_used} only"
    assert run["node2_ids"] & stage_nodes, "no ingest stage ran on node 2"


@pytest.fixture(scope="module")
def ingested(cluster, ingest_with_node_loss):
    """A replacement node 2 joins; the same ingest command finishes what the lost node left."""
    cluster.add_second_node()
    run = ingest_with_node_loss
    cluster.run_job("ingest-2", *ingest_command(cluster.root, run["samples"][0].parent, run["out"]))
    return run["out"]


def test_rerun_after_node_loss_finishes_every_video(ingested, samples):
    rows = manifest(ingested)
    assert set(rows) == {p.name for p in samples}
    for name, r in rows.items():
        assert r["status"] == "ok", f"{name}: {r['status']} {r['reason']}"
        frames = pq.ParquetFile(ingested / "frames" / f"{r['video_id']}.parquet").metadata.num_rows
        assert frames == r["num_frames"] >= 136, f"{name}: {frames} frame rows, manifest says {r['num_frames']}"


def test_training_that_would_starve_its_reader_is_refused_in_seconds(cluster, ingested):
    """Issue 27's hang: 0.75-CPU workers spread over the two 1-CPU nodes leave 0.25 CPU on each,
    and a read task needs 0.5 (``train.reader_cpus``). The job stops before any Ray Train actor
    or MLflow run, with one line naming the resource and the figures; ``ray job submit`` exits
    non-zero."""
    start = time.monotonic()
    rc, out = cluster.finish_job("train-starved", "python", str(ROOT / "train.py"), "--data", str(ingested),
                                 "--stage", "1", "--job-name", "starved", *job_overrides(cluster.root),
                                 "train.cpus_per_worker=0.75")
    took = time.monotonic() - start
    print(f"starved training job refused after {took:.1f} s")
    assert rc != 0 and cluster.get("/api/jobs/train-starved")["status"] == "FAILED", out[-3000:]
    line = next((ln for ln in out.splitlines() if ln.startswith("train.py: error:")), None)
    assert line is not None, out[-3000:]
    for part in ("needs CPU 0.5 per read task (train.reader_cpus)", "2 workers of CPU 0.75",
                 "train.placement=spread", "at most CPU 0.25 free", "train.data_loader=torch"):
        assert part in line, (part, line)
    assert not cluster.job_actors("train-starved", "TrainController"), "Ray Train started for a refused job"
    assert not (cluster.root / "ray_results" / "starved").exists()
    assert took < JOB_TIMEOUT_S / 3  # it ended by itself, long before a hang would be cut off


def test_working_dir_job_with_relative_result_paths_is_refused(cluster):
    """``--working-dir``: Ray runs ``train.py`` in its copy of the checkout; the default
    ``sqlite:///mlflow.db``, ``mlruns`` and ``work/ray_results`` would resolve inside it."""
    rc, out = cluster.finish_job("train-workdir", "python", "train.py", "--data", str(cluster.root / "no-data"),
                                 f"weights.tiny_dir={cluster.root}/tiny_weights",
                                 submit_args=("--working-dir", str(ROOT)))
    assert rc != 0 and cluster.get("/api/jobs/train-workdir")["status"] == "FAILED", out[-3000:]
    line = next((ln for ln in out.splitlines() if ln.startswith("train.py: error:")), "")
    for part in ("temporary copy", "tracking.tracking_uri=sqlite:///mlflow.db", "tracking.artifact_root=mlruns",
                 "train.storage_path=work/ray_results", "absolute"):
        assert part in line, (part, out[-3000:])
    assert "runtime_resources" in line, line  # the copy named is Ray's, in the head's session folder


@pytest.fixture(scope="module")
def trained(cluster, ingested):
    log = cluster.run_job("train-1", "python", str(ROOT / "train.py"), "--data", str(ingested), "--stages", "1,2",
                          *job_overrides(cluster.root), "train.max_steps=2", "train.checkpoint_every=2",
                          "train.eval_every=0", "train.eval_sample_steps=0", "train.eval_max_batches=1")
    return log


def test_training_job_registers_a_model(cluster, trained):
    assert "stage 1: models:/loopy/1" in trained and "stage 2: models:/loopy/2" in trained, trained[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cluster.root}/mlflow.db")
    version = client.get_model_version_by_alias("loopy", "stage2")
    assert str(version.version) == "2"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert "loss" in run.data.metrics, run.data.metrics


def test_training_spans_both_nodes_one_worker_each(cluster, trained):
    """The defaults (placement auto -> spread, Ray Data loader): each stage's worker group, as Ray's
    state API records it, is two actors on two different nodes, together both nodes; the DDP
    process group the workers report is 2 ranks on 2 nodes."""
    workers = cluster.job_actors("train-1", "RayTrainWorker")
    groups: dict = {}
    for actor in workers:
        groups.setdefault(actor["placement_group_id"], []).append(actor["node_id"])
    assert len(groups) >= 2, f"expected a worker group per stage: {workers}"  # more after a restart
    for pg, node_ids in groups.items():
        assert len(node_ids) == 2 and len(set(node_ids)) == 2, f"placement group {pg}: workers on {node_ids}"
    alive = {n["node_id"] for n in cluster.alive_nodes()}
    assert {n for ids in groups.values() for n in ids} == alive
    assert re.findall(r"\[train\] stage (\d): DDP world size (\d+) on (\d+) node", trained) == [
        ("1", "2", "2"), ("2", "2", "2")], trained[-3000:]
    # one [train] line per event, and no resume warning on a fresh start
    for stage in (1, 2):
        for step in (1, 2):
            assert trained.count(f"[train] stage {stage} step {step}/2 loss") == 1, (stage, step, trained[-3000:])
    assert "cannot read the latest checkpoint's step" not in trained
    # results where the job's settings say: checkpoints under train.storage_path, MLflow in its sqlite file
    storage = cluster.root / "ray_results"
    job = (storage / "latest_job").read_text().strip()
    for stage in (1, 2):
        assert list((storage / job / f"stage{stage}").glob("checkpoint_*")), f"no stage-{stage} checkpoint"
        assert (storage / job / f"stage{stage}_package" / "loopy" / "config.json").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cluster.root}/mlflow.db")
    for version in ("1", "2"):
        run = client.get_run(client.get_model_version("loopy", version).run_id)
        assert run.data.tags["loopy.world_size"] == "2" and run.data.tags["loopy.ddp_nodes"] == "2", run.data.tags
        artifacts = Path(urllib.parse.urlparse(run.info.artifact_uri).path).resolve()
        assert (cluster.root / "mlruns").resolve() in artifacts.parents, run.info.artifact_uri


def test_evaluation_job_scores_the_registered_model(cluster, trained, ingested):
    out = cluster.root / "evaluation.json"
    cluster.run_job("evaluate-1", "python", str(ROOT / "evaluate.py"), "--model", "models:/loopy@stage2",
                    "--data", str(ingested), "--split", "train", "--out", str(out), *job_overrides(cluster.root),
                    "evaluation.max_videos=1", "evaluation.max_seconds=1.0", "evaluation.steps=2",
                    "evaluation.cpus_per_actor=0.5", "evaluation.side_by_side_videos=0", "evaluation.alias=null",
                    f"evaluation.output_dir={cluster.root}/evaluation")
    result = json.loads(out.read_text())
    assert result["split"] == "train" and result["videos"], result
    assert result["mean"], result
