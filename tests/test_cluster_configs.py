"""The cluster definitions (cluster/) agree with each other and with the configs the jobs read.

Every YAML is parsed; required fields are present; one image everywhere; the Ray and torch
versions match what the project is tested with; the GPUs and CPUs the jobs ask for
(configs/cluster.yaml) fit in the clusters that run them; entrypoints name scripts and config
files that exist and load; the laptop defaults never name a non-loopback address.
"""
from __future__ import annotations

import ast
import ipaddress
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from core.config import PlatformConfig, flatten, load_platform_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
LAUNCHER = CLUSTER / "ray-cluster.aws.yaml"
CLUSTER_CONFIG = ROOT / "configs" / "cluster.yaml"
IMAGE_ROOT = "/app"  # WORKDIR of cluster/Dockerfile: the repository root inside the image
SHARED = "/mnt/shared"  # the shared volume every Ray node mounts
DATA_BUCKET = "loopy-data"  # the bucket of raw videos, ingested Parquet and checkpoints (cluster/README.md)
THIRD_PARTY_IMAGES = {"postgres"}  # images that are not the project image (name before the tag)
NAMESPACE = "loopy"


# --- helpers ------------------------------------------------------------------------------------

def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def k8s_objects() -> dict[tuple[str, str], dict]:
    """All Kubernetes objects of cluster/k8s/, keyed by (kind, name)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{path}: {key} defined twice"
            out[key] = doc
    return out


def find_key(node, key: str):
    """Every value stored under ``key`` anywhere in a nested YAML structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from find_key(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from find_key(item, key)


def ray_cluster_spec(obj: dict) -> dict:
    """The RayCluster spec of a RayCluster, RayJob or RayService object."""
    kind = obj["kind"]
    if kind == "RayCluster":
        return obj["spec"]
    if kind == "RayJob":
        return obj["spec"]["rayClusterSpec"]
    if kind == "RayService":
        return obj["spec"]["rayClusterConfig"]
    raise AssertionError(f"{kind} has no Ray cluster spec")


def quantity(value) -> float:
    """Kubernetes CPU / GPU quantity ("88", 8, "500m") -> a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def group_capacity(group: dict, resource: str) -> float:
    """Most of ``resource`` (``cpu`` or ``nvidia.com/gpu``) one worker group can hold (maxReplicas)."""
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
    limit = container["resources"]["limits"].get(resource, 0)
    return quantity(limit) * int(group.get("maxReplicas", group["replicas"]))


def cluster_gpus(spec: dict) -> float:
    total = 0.0
    for group in spec["workerGroupSpecs"]:
        gpus = group_capacity(group, "nvidia.com/gpu")
        if gpus:
            per_pod = group_capacity(group, "nvidia.com/gpu") / int(group.get("maxReplicas", group["replicas"]))
            assert quantity(group["rayStartParams"]["num-gpus"]) == per_pod, (
                f"group {group['groupName']}: rayStartParams num-gpus differs from the pod's GPU limit"
            )
        total += gpus
    return total


def gpu_budget_errors(cfg: PlatformConfig, gpus_available: float) -> list[str]:
    """What does not fit: Ray Train workers x GPUs per worker against the GPUs of a cluster."""
    errors = []
    if cfg.train.use_gpu:
        need = cfg.train.num_workers * cfg.train.gpus_per_worker
        if need > gpus_available:
            errors.append(f"train.num_workers x train.gpus_per_worker = {need:g} > {gpus_available:g} GPUs")
    return errors


def repo_path(path_in_image: str) -> Path:
    assert path_in_image.startswith(IMAGE_ROOT + "/"), f"{path_in_image}: not under the image's {IMAGE_ROOT}"
    return ROOT / path_in_image[len(IMAGE_ROOT) + 1:]


def is_loopback_or_local(value: str) -> bool:
    """True unless ``value`` names a network host other than the loopback interface."""
    if "://" not in value:
        try:
            return ipaddress.ip_address(value).is_loopback
        except ValueError:
            return value not in ("0.0.0.0", "::") and not re.fullmatch(r"[\w.-]+:\d+", value)
    parsed = urlparse(value)
    if parsed.scheme in ("sqlite", "file", "mlflow-artifacts", "models", "runs"):
        return not parsed.netloc or parsed.netloc in ("localhost", "127.0.0.1")
    host = parsed.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def cluster_cfg() -> PlatformConfig:
    return load_platform_config(CLUSTER_CONFIG)


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    return k8s_objects()


# --- every file parses, required fields ----------------------------------------------------------

def test_every_yaml_parses_with_required_fields():
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert LAUNCHER in paths and len(paths) >= 6
    for path in paths:
        docs = load_docs(path)
        if path.parent == K8S:
            for doc in docs:
                for field in ("apiVersion", "kind", "metadata"):
                    assert field in doc, f"{path}: {doc.get('kind')} lacks {field}"
                assert doc["metadata"].get("name"), f"{path}: {doc['kind']} has no metadata.name"
                if doc["kind"] != "Namespace":
                    assert doc["metadata"].get("namespace") == NAMESPACE, f"{path}: {doc['kind']} not in {NAMESPACE}"


def test_launcher_file_fits_rays_own_schema():
    import json

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    (cfg,) = load_docs(LAUNCHER)
    jsonschema.validate(cfg, schema)
    broken = {k: v for k, v in cfg.items() if k != "provider"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_defines_24_a100s_and_cpu_decoders(cluster_cfg):
    (cfg,) = load_docs(LAUNCHER)
    for field in ("cluster_name", "max_workers", "provider", "auth", "docker", "available_node_types",
                  "head_node_type", "head_start_ray_commands", "worker_start_ray_commands"):
        assert field in cfg, f"{LAUNCHER.name}: missing {field}"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpus = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in types.values())
    cpu_only = {n: t for n, t in types.items() if not t["resources"].get("GPU") and n != cfg["head_node_type"]}
    assert gpus == 24, f"{LAUNCHER.name}: {gpus} GPUs, the plan is 24 A100s"
    assert cpu_only, "no CPU worker type for decoding"
    for name, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], f"{name}: min_workers > max_workers"
    assert sum(t["max_workers"] for n, t in types.items() if n != cfg["head_node_type"]) <= cfg["max_workers"]
    cpus = sum(t["resources"]["CPU"] * t["max_workers"] for t in cpu_only.values())
    assert cluster_cfg.ingest.num_decode_workers <= cpus
    assert not gpu_budget_errors(cluster_cfg, gpus)


# --- one image, matching versions ----------------------------------------------------------------

def project_images() -> dict[str, set[str]]:
    images: dict[str, set[str]] = {}
    (launcher,) = load_docs(LAUNCHER)
    images.setdefault(launcher["docker"]["image"], set()).add(LAUNCHER.name)
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            for image in find_key(doc, "image"):
                if image.split(":")[0] not in THIRD_PARTY_IMAGES:
                    images.setdefault(image, set()).add(path.name)
    return images


def test_one_project_image_everywhere():
    images = project_images()
    assert len(images) == 1, f"different images: {images}"
    (image,) = images
    assert ":" in image and not image.endswith(":latest"), f"{image}: pin a tag"
    readme = (CLUSTER / "README.md")
    if readme.exists():
        assert image in readme.read_text(), "cluster/README.md builds a different image tag"
    assert f"-t {image}" in (CLUSTER / "Dockerfile").read_text()


def test_dockerfile_pins_the_tested_versions_and_copies_the_packages():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", text, re.M)
    assert base and base.group(1) == ray.__version__, "base image Ray version differs from the tested ray"
    torch_pin = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in text
    assert "torch==${TORCH_VERSION} -e ." in text, "the project install must repeat the torch pin"
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", text, re.M)
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setup["packages"]["find"]["include"]  # "core*", "pipelines*", ...: top-level packages and their sub-packages
    packages = [pat.rstrip("*") for pat in patterns]
    assert packages and all((ROOT / pkg / "__init__.py").is_file() for pkg in packages)
    for package in packages:
        assert f"COPY {package} ./{package}" in text, f"Dockerfile does not copy package {package}"
    for module in setup.get("py-modules", []):
        assert f"COPY {module}.py ./{module}.py" in text, f"Dockerfile does not copy {module}.py"
    assert "COPY configs ./configs" in text


def test_ray_versions_match(objects):
    import ray

    for (kind, name), obj in objects.items():
        if kind.startswith("Ray"):
            assert ray_cluster_spec(obj)["rayVersion"] == ray.__version__, f"{kind}/{name}: rayVersion"


# --- resources against what the jobs read --------------------------------------------------------

def test_cluster_config_loads_and_targets_the_cluster(cluster_cfg):
    assert cluster_cfg.ray.address == "auto"
    assert cluster_cfg.weights.preset == "sd15" and cluster_cfg.model.preset == "sd15"
    for location in (cluster_cfg.weights.sd15, cluster_cfg.weights.vae, cluster_cfg.weights.wav2vec2,
                     cluster_cfg.serve.job_dir):
        assert location.startswith(SHARED + "/"), f"{location}: not on the shared volume"
    # data in the bucket by default (issue 25); the shared volume is the documented alternative
    assert cluster_cfg.train.storage_path.startswith(f"s3://{DATA_BUCKET}/"), cluster_cfg.train.storage_path
    assert cluster_cfg.train.use_gpu and cluster_cfg.train.num_workers == 24
    assert cluster_cfg.train.num_workers * cluster_cfg.train.batch_size == 24, "the paper's global batch is 24"
    assert cluster_cfg.ingest.use_gpu and cluster_cfg.ingest.crop_size == 512


def test_training_job_fits_its_cluster(objects, cluster_cfg):
    spec = ray_cluster_spec(objects[("RayJob", "loopy-train")])
    gpus = cluster_gpus(spec)
    assert gpus == 24
    assert not gpu_budget_errors(cluster_cfg, gpus)
    interactive = cluster_gpus(ray_cluster_spec(objects[("RayCluster", "loopy")]))
    assert not gpu_budget_errors(cluster_cfg, interactive)
    cpus = sum(group_capacity(g, "cpu") for g in spec["workerGroupSpecs"])
    assert cluster_cfg.train.num_workers * cluster_cfg.train.cpus_per_worker <= cpus


def test_gpu_budget_check_catches_an_oversized_job(cluster_cfg):
    too_big = load_platform_config(CLUSTER_CONFIG, ["train.num_workers=32"])
    assert gpu_budget_errors(too_big, 24)
    two_each = load_platform_config(CLUSTER_CONFIG, ["train.gpus_per_worker=2"])
    assert gpu_budget_errors(two_each, 24)
    assert not gpu_budget_errors(cluster_cfg, 24)


def ingest_budget_errors(cfg: PlatformConfig, gpus: float, cpus: float) -> list[str]:
    """What does not fit: the ingest actor pools' GPUs, and every stage's CPUs at full size."""
    ing, errors = cfg.ingest, []
    model_actors = ing.num_vae_actors + ing.num_audio_actors
    if ing.use_gpu and model_actors * ing.model_num_gpus > gpus:
        errors.append(f"(num_vae_actors + num_audio_actors) x model_num_gpus = "
                      f"{model_actors * ing.model_num_gpus:g} > {gpus:g} GPUs")
    tasks = ing.num_detect_actors + (ing.num_decode_workers or 0) + model_actors
    if tasks * ing.stage_num_cpus > cpus:
        errors.append(f"all stages at full size need {tasks * ing.stage_num_cpus:g} CPUs > {cpus:g}")
    return errors


def test_ingest_job_fits_its_cluster(objects, cluster_cfg):
    spec = ray_cluster_spec(objects[("RayJob", "loopy-ingest")])
    gpus = cluster_gpus(spec)
    assert gpus > 0, "ingest.use_gpu but the ingest cluster has no GPU"
    cpus = sum(group_capacity(g, "cpu") for g in spec["workerGroupSpecs"])
    decode_cpus = sum(group_capacity(g, "cpu") for g in spec["workerGroupSpecs"]
                      if not group_capacity(g, "nvidia.com/gpu"))
    assert decode_cpus >= cluster_cfg.ingest.num_decode_workers * cluster_cfg.ingest.stage_num_cpus
    assert not ingest_budget_errors(cluster_cfg, gpus, cpus)
    assert ingest_budget_errors(load_platform_config(CLUSTER_CONFIG, ["ingest.num_vae_actors=100"]), gpus, cpus)
    assert ingest_budget_errors(load_platform_config(CLUSTER_CONFIG, ["ingest.num_detect_actors=900"]), gpus, cpus)


def test_sampler_service_fits_and_runs_the_serve_app(objects, cluster_cfg):
    service = objects[("RayService", "loopy-sampler")]
    gpus = cluster_gpus(ray_cluster_spec(service))
    assert cluster_cfg.serve.num_replicas * cluster_cfg.serve.gpus_per_replica <= gpus
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert len(apps) == 1
    module, _, attr = apps[0]["import_path"].partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"RayService imports {module}, {source} does not exist"
    tree = ast.parse(source.read_text())
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    names |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert attr in names, f"{source} defines no top-level {attr}"
    local = ROOT / "serve" / "serve_config.yaml"
    local_apps = yaml.safe_load(local.read_text())["applications"]
    assert apps[0]["import_path"] in {a["import_path"] for a in local_apps}, "not the app of serve/serve_config.yaml"
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_cfg["http_options"]["port"] == cluster_cfg.serve.port
    config_arg = apps[0]["args"]["config"]
    assert repo_path(config_arg) == CLUSTER_CONFIG
    from models.registry import stage_alias

    assert cluster_cfg.serve.model == f"models:/{cluster_cfg.tracking.registered_model}@{stage_alias(2)}", \
        "serve.model must name the alias training moves (models.registry.stage_alias)"


@pytest.mark.parametrize("name, script, flags", [
    ("loopy-ingest", "pipelines/ingest.py", {"--input", "--output", "--config"}),
    ("loopy-train", "train.py", {"--data", "--stages", "--config"}),
])
def test_job_entrypoints_name_existing_files(objects, name, script, flags):
    argv = shlex.split(objects[("RayJob", name)]["spec"]["entrypoint"])
    assert argv[0] == "python"
    assert repo_path(argv[1]) == ROOT / script
    assert (ROOT / script).is_file(), f"{script} does not exist"
    given = {a for a in argv if a.startswith("--")}
    assert flags <= given, f"{name}: missing {flags - given}"
    config = repo_path(argv[argv.index("--config") + 1])
    assert config == CLUSTER_CONFIG
    load_platform_config(config)
    for flag in ("--input", "--output", "--data"):
        if flag in argv:  # the data bucket by default (issue 25)
            assert argv[argv.index(flag) + 1].startswith(f"s3://{DATA_BUCKET}/")


def test_every_data_pod_reaches_the_bucket_with_the_pod_role(objects):
    """Every Ray pod of the data jobs runs as the service account whose role holds the bucket
    credentials (never keys in a manifest); a static-key Secret is optional."""
    sa = objects[("ServiceAccount", "loopy-data")]
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    for key in (("RayJob", "loopy-ingest"), ("RayJob", "loopy-train"), ("RayCluster", "loopy")):
        if key not in objects:
            continue
        spec = ray_cluster_spec(objects[key])
        for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert pod["spec"].get("serviceAccountName") == "loopy-data", key
            for container in pod["spec"]["containers"]:
                if "loopy-platform/loopy" not in container["image"]:
                    continue
                env = {e["name"]: e for e in container.get("env", [])}
                assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), key  # never inline keys
                assert {"secretRef": {"name": "loopy-s3", "optional": True}} in container.get("envFrom", []), key


def test_every_ray_pod_mounts_the_shared_volume(objects):
    assert ("PersistentVolumeClaim", "loopy-shared") in objects
    for (kind, name), obj in objects.items():
        if not kind.startswith("Ray"):
            continue
        spec = ray_cluster_spec(obj)
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
            assert "loopy-shared" in claims, f"{kind}/{name}: a pod without the shared volume"
            for container in pod["spec"]["containers"]:
                assert SHARED in {m["mountPath"] for m in container["volumeMounts"]}


def test_mlflow_server_postgres_backend_object_store_and_service(objects, cluster_cfg):
    deployment = objects[("Deployment", "mlflow")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "mlflow server" in command and "--serve-artifacts" in command
    assert re.search(r"--artifacts-destination s3://\S+", command)
    assert "--backend-store-uri \"$MLFLOW_BACKEND_STORE_URI\"" in command
    secrets = {e["secretRef"]["name"] for e in container["envFrom"]}
    assert "mlflow-postgres" in secrets, "backend DSN must come from a Secret"
    postgres = objects[("StatefulSet", "mlflow-postgres")]
    assert postgres["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:")
    uri = urlparse(cluster_cfg.tracking.tracking_uri)
    service = objects[("Service", "mlflow")]
    assert uri.hostname in (f"mlflow.{NAMESPACE}.svc.cluster.local", f"mlflow.{NAMESPACE}", "mlflow")
    assert uri.port in {p["port"] for p in service["spec"]["ports"]}
    assert f"{uri.hostname}:{uri.port}" in command, "--allowed-hosts must admit the tracking URI"
    from core.paths import resolve_artifact_root, resolve_tracking_uri

    assert resolve_tracking_uri(cluster_cfg.tracking.tracking_uri) == cluster_cfg.tracking.tracking_uri
    artifacts = urlparse(resolve_artifact_root(cluster_cfg.tracking.artifact_root))
    assert artifacts.scheme == "mlflow-artifacts", "artifacts must go through the server (--serve-artifacts)"
    assert (artifacts.hostname, artifacts.port) == (uri.hostname, uri.port)


# --- the laptop stays on loopback ---------------------------------------------------------------

def test_local_defaults_use_only_loopback():
    for source, cfg in (("dataclass defaults", PlatformConfig()),
                        ("configs/tiny.yaml", load_platform_config(ROOT / "configs" / "tiny.yaml"))):
        assert cfg.ray.address == "local", source
        assert cfg.weights.local_files_only, source
        for key, value in flatten(cfg).items():
            if isinstance(value, str):
                assert is_loopback_or_local(value), f"{source}: {key}={value!r} leaves the machine"
    assert "--host 127.0.0.1" in (ROOT / "Makefile").read_text()


def test_loopback_check_flags_remote_addresses():
    assert is_loopback_or_local("127.0.0.1") and is_loopback_or_local("sqlite:///mlflow.db")
    assert is_loopback_or_local("http://localhost:5000") and is_loopback_or_local("mlruns")
    assert not is_loopback_or_local("0.0.0.0")
    assert not is_loopback_or_local("http://mlflow.loopy.svc.cluster.local:5000")
    assert not is_loopback_or_local("ray://10.0.0.5:10001")


def test_scale_plan_arithmetic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_plan", CLUSTER / "scale_plan.py")
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    rows = {("cluster", "cpu_s_per_frame_decode_full_1080p_crop512"): {"value": 0.010},
            ("cluster", "cpu_s_per_frame_decode_detect_pass_480"): {"value": 0.010},
            ("cluster", "cpu_s_per_frame_dlib_1080p_at_480"): {"value": 0.020},
            ("cluster", "vae_encode_512px_per_frame"): {"value": 1.0}}
    text = sp.plan(rows, hours=160)
    assert "**14.4 M frames**" in text
    assert "| **total** | **40 ms** | sum |" in text  # 2 decodes + detection
    assert "**160 core-hours**" in text  # 0.04 s x 14.4e6 / 3600
    assert "| latent fp16 [4, 64, 64] | 32,768 |" in text and "| audio fp16 [12, 768] | 18,432 |" in text
    assert "Training" not in text  # no training rows given, no training table


# --- object store memory, dashboard exposure, tokens (issue 14 items 8 and 10, issue 13 item 2) --

RAY_AUTH_SECRET = "loopy-ray-auth"  # key auth_token: Ray's token (dashboard, job API, GCS)
SERVE_TOKENS_SECRET = "loopy-serve-tokens"  # key tokens: one "client_id token" line per client
SERVE_TOKENS_ENV = "LOOPY_SERVE_TOKENS_FILE"


def quantity_bytes(value) -> float:
    """Kubernetes memory quantity ("6Gi", "500Mi", "64G", 1024) -> bytes."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def ray_pods(obj: dict) -> list[tuple[str, dict, dict]]:
    """(group name, rayStartParams, pod template) of the head and every worker group."""
    spec = ray_cluster_spec(obj)
    head = spec["headGroupSpec"]
    return [("head", head.get("rayStartParams", {}), head["template"])] + [
        (g["groupName"], g.get("rayStartParams", {}), g["template"]) for g in spec["workerGroupSpecs"]]


def ray_container(pod: dict) -> dict:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] in ("ray-head", "ray-worker")]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def shm_errors(where: str, params: dict, pod: dict) -> list[str]:
    """What is wrong with a Ray pod's /dev/shm: missing, not memory-backed, unsized, smaller than
    the object store Ray is told to put there, or taking most of the container's memory."""
    container = ray_container(pod)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if "/dev/shm" not in mounts:
        return [f"{where}: no volume on /dev/shm (Ray falls back to a disk-backed object store)"]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    empty_dir = volumes.get(mounts["/dev/shm"], {}).get("emptyDir")
    if not empty_dir or empty_dir.get("medium") != "Memory":
        return [f"{where}: /dev/shm is not an emptyDir with medium Memory"]
    if "sizeLimit" not in empty_dir:
        return [f"{where}: /dev/shm emptyDir has no sizeLimit"]
    shm = quantity_bytes(empty_dir["sizeLimit"])
    errors = []
    store = params.get("object-store-memory")
    if store is None:
        errors.append(f"{where}: rayStartParams has no object-store-memory (Ray's default may not fit /dev/shm)")
    elif float(store) > shm:
        errors.append(f"{where}: object-store-memory {float(store):.3g} B > /dev/shm {shm:.3g} B")
    memory = quantity_bytes(container["resources"]["limits"]["memory"])
    if shm > 0.5 * memory:
        errors.append(f"{where}: /dev/shm {shm:.3g} B is more than half the container's memory {memory:.3g} B")
    return errors


def test_every_ray_pod_has_a_sized_memory_dev_shm(objects):
    ray_objects = {k: o for k, o in objects.items() if k[0].startswith("Ray")}
    assert len(ray_objects) == 4
    errors = []
    for (kind, name), obj in ray_objects.items():
        for group, params, pod in ray_pods(obj):
            errors += shm_errors(f"{kind}/{name}/{group}", params, pod)
    assert not errors, "\n".join(errors)


def test_shm_check_catches_a_missing_or_disk_backed_volume(objects):
    import copy

    group, params, pod = ray_pods(objects[("RayJob", "loopy-ingest")])[-1]  # cpu-decode
    assert group == "cpu-decode" and not shm_errors(group, params, pod)
    no_mount = copy.deepcopy(pod)
    ray_container(no_mount)["volumeMounts"] = [m for m in ray_container(no_mount)["volumeMounts"]
                                               if m["mountPath"] != "/dev/shm"]
    assert shm_errors(group, params, no_mount)
    on_disk = copy.deepcopy(pod)
    for v in on_disk["spec"]["volumes"]:
        v.get("emptyDir", {}).pop("medium", None)
    assert shm_errors(group, params, on_disk)
    assert shm_errors(group, {**params, "object-store-memory": str(64 * 2**30)}, pod)


def test_dashboard_and_job_api_never_on_all_interfaces(objects):
    """The dashboard is a job-submission API (remote code execution): never 0.0.0.0 (KubeRay's
    default when rayStartParams names no dashboard-host). Loopback where the operator does not
    need it (RayCluster: kubectl port-forward; RayJobs: the SidecarMode submitter uses localhost);
    the RayService's pod IP, because KubeRay deploys the Serve config through it."""
    for (kind, name), obj in objects.items():
        if not kind.startswith("Ray"):
            continue
        params = ray_cluster_spec(obj)["headGroupSpec"]["rayStartParams"]
        host = params.get("dashboard-host")
        assert host is not None, f"{kind}/{name}: no dashboard-host: KubeRay binds 0.0.0.0"
        assert host not in ("0.0.0.0", "::", "[::]", ""), f"{kind}/{name}: dashboard on every interface"
        head = ray_container(ray_cluster_spec(obj)["headGroupSpec"]["template"])
        if kind == "RayJob":
            assert host == "127.0.0.1", f"{kind}/{name}: dashboard-host {host}"
            assert obj["spec"].get("submissionMode") == "SidecarMode", \
                f"{kind}/{name}: a loopback dashboard needs the submitter inside the head pod"
            assert ray_cluster_spec(obj)["headGroupSpec"]["template"]["spec"].get("restartPolicy") == "Never"
        elif kind == "RayCluster":
            assert host == "127.0.0.1", f"{kind}/{name}: dashboard-host {host}"
        else:  # RayService: the pod's own address, and probes that do not ask localhost:8265
            assert host == "$POD_IP", f"{kind}/{name}: dashboard-host {host}"
            pod_ip = env_of(head).get("POD_IP", {})
            assert pod_ip.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP"
            for probe in ("readinessProbe", "livenessProbe"):
                command = " ".join(head[probe]["exec"]["command"])
                assert "$POD_IP:8265" in command and "localhost:8265" not in command, f"{name}: {probe}"
    (launcher,) = load_docs(LAUNCHER)
    for command in launcher["head_start_ray_commands"]:
        if command.startswith("ray start"):
            assert "--dashboard-host=127.0.0.1" in command, command


def test_ray_token_auth_everywhere_from_a_secret(objects):
    """RAY_AUTH_MODE=token in every Ray container with the token from the Secret, and the
    operator told the same Secret (it calls the dashboard for RayService / RayJob)."""
    for (kind, name), obj in objects.items():
        if not kind.startswith("Ray"):
            continue
        spec = ray_cluster_spec(obj)
        assert spec.get("authOptions") == {"mode": "token", "secretName": RAY_AUTH_SECRET}, f"{kind}/{name}"
        for group, _, pod in ray_pods(obj):
            env = env_of(ray_container(pod))
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{kind}/{name}/{group}"
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": RAY_AUTH_SECRET, "key": "auth_token"}, f"{kind}/{name}/{group}: {ref}"
            assert "value" not in env["RAY_AUTH_TOKEN"], "a token written into a manifest"
    (launcher,) = load_docs(LAUNCHER)
    options = " ".join(launcher["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options
    token_path = re.search(r"-e RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    assert launcher["file_mounts"][token_path] == "~/.ray/auth_token", "the token made by ray get-auth-token"


def test_service_client_tokens_come_from_a_mounted_secret_file(objects, cluster_cfg):
    service = objects[("RayService", "loopy-sampler")]
    for group, _, pod in ray_pods(service):
        container = ray_container(pod)
        path = env_of(container).get(SERVE_TOKENS_ENV, {}).get("value")
        assert path, f"{group}: no {SERVE_TOKENS_ENV}"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        folder, _, key = path.rpartition("/")
        assert folder in mounts and mounts[folder].get("readOnly"), f"{group}: {folder} not mounted read-only"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        secret = volumes[mounts[folder]["name"]]["secret"]
        assert secret["secretName"] == SERVE_TOKENS_SECRET and key == "tokens"
        assert secret.get("defaultMode", 0o644) & 0o007 == 0, "tokens file readable by everyone"
    # the tokens are never in the platform config (it goes to MLflow params and model packages)
    secrets = [key for key, value in flatten(cluster_cfg).items()
               if key.rsplit(".", 1)[-1].lower() in ("token", "tokens", "auth_token") and value]
    assert not secrets, f"tokens in configs/cluster.yaml: {secrets}"
    (launcher,) = load_docs(LAUNCHER)
    options = " ".join(launcher["docker"]["run_options"])
    tokens_path = re.search(rf"-e {SERVE_TOKENS_ENV}=(\S+)", options).group(1)
    assert tokens_path in launcher["file_mounts"]


def test_launcher_shm_holds_rays_default_object_store():
    """Docker's /dev/shm of each node type >= Ray's default object store there (30 % of the
    instance's memory, at most 200 GB); memory per instance type from AWS's published sizes."""
    from ray._private import ray_constants

    instance_memory_gib = {"m6i.4xlarge": 64, "p4d.24xlarge": 1152, "c6i.8xlarge": 64}
    (cfg,) = load_docs(LAUNCHER)
    docker = cfg["docker"]
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    for name, node_type in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            options = docker.get("run_options", []) + docker.get("head_run_options", [])
        else:
            options = (docker.get("run_options", []) + docker.get("worker_run_options", [])
                       + node_type.get("docker", {}).get("worker_run_options", []))
        sizes = [o.split("=", 1)[1] for o in options if o.startswith("--shm-size=")]
        assert len(sizes) == 1, f"{name}: {len(sizes)} --shm-size options"
        shm = float(sizes[0][:-1]) * units[sizes[0][-1].lower()]
        memory = instance_memory_gib[node_type["node_config"]["InstanceType"]] * 2**30
        store = min(memory * ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION,
                    ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES)
        assert store <= shm < memory, f"{name}: /dev/shm {shm:.3g} B for a {store:.3g} B object store"


# --- the Ray the project is pinned to (issue 14 item 9) ------------------------------------------

def ray_requirement():
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    return req


def test_ray_pin_is_a_closed_range_holding_the_installed_ray():
    """>= 2.52 (Train V2 on by default since 2.51, token authentication since 2.52) and < 2.64
    (the ``**ray_remote_args`` retry limits the ingest passes are removed in 2.64)."""
    import ray
    from packaging.version import Version

    spec = ray_requirement().specifier
    assert {"data", "train", "serve"} <= ray_requirement().extras
    assert Version(ray.__version__) in spec, f"installed ray {ray.__version__} outside {spec}"
    assert Version("2.51.0") not in spec and Version("2.52.0") in spec
    assert Version("2.63.9") in spec and Version("2.64.0") not in spec


def test_the_ray_apis_the_project_calls_exist():
    """Signatures of what the jobs call: an install that lost one fails here, not mid-job."""
    import inspect
    import os

    import ray.data
    import ray.train
    import ray.train.torch
    from ray import serve
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy
    from ray.data.collate_fn import NumpyBatchCollateFn
    from ray.scripts.scripts import cli
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    def params(fn):
        return inspect.signature(fn).parameters

    # ingest (pipelines/ingestion/job.py): actor / task pools with retry limits as remote args
    for method in (ray.data.Dataset.map, ray.data.Dataset.map_batches, ray.data.Dataset.flat_map):
        p = params(method)
        assert "compute" in p and "num_cpus" in p, method.__name__
        assert any(v.kind is inspect.Parameter.VAR_KEYWORD for v in p.values()), \
            f"Dataset.{method.__name__} takes no **ray_remote_args (max_task_retries, max_restarts, max_retries)"
    assert {"min_size", "max_size"} <= set(params(ActorPoolStrategy)) and "size" in params(TaskPoolStrategy)
    ctx = DataContext.get_current()
    for name in ("max_errored_blocks", "enable_progress_bars", "print_on_execution_start"):
        assert hasattr(ctx, name), f"DataContext.{name}"
    assert inspect.isclass(NumpyBatchCollateFn)
    # training: Train V2 by default (resume by run name), validation, async checkpoint upload
    saved = os.environ.pop(V2_ENABLED_ENV_VAR, None)
    try:
        assert is_v2_enabled(), "Ray Train V2 is not the default"
    finally:
        if saved is not None:
            os.environ[V2_ENABLED_ENV_VAR] = saved
    assert ray.train.torch.TorchTrainer.__module__.startswith("ray.train.v2")
    assert "validation_config" in params(ray.train.torch.TorchTrainer)
    assert {"checkpoint", "checkpoint_upload_mode", "validation"} <= set(params(ray.train.report))
    for name in ("CheckpointConfig", "DataConfig", "FailureConfig", "RunConfig", "ScalingConfig",
                 "ValidationConfig", "CheckpointUploadMode", "Checkpoint", "get_context", "get_checkpoint",
                 "get_dataset_shard"):
        assert hasattr(ray.train, name), f"ray.train.{name}"
    assert "name" in params(ray.train.RunConfig) and "storage_path" in params(ray.train.RunConfig)
    # serving (serve/app.py)
    assert {"max_ongoing_requests", "health_check_period_s", "num_replicas"} <= set(params(serve.deployment))
    for name in ("ingress", "start", "run", "shutdown"):
        assert hasattr(serve, name), f"serve.{name}"
    # the cluster's token: `ray get-auth-token --generate` (README, cluster/README.md)
    assert "get-auth-token" in cli.commands
    assert any("--generate" in p.opts for p in cli.commands["get-auth-token"].params)


# --- who may reach the RayService's dashboard ---------------------------------------------------------

def _pod_labels(template: dict) -> dict:
    return template.get("metadata", {}).get("labels", {}) or {}


def dashboard_exposure(objects: dict, service: str) -> list[str]:
    """Problems with the NetworkPolicy guarding RayService ``service``: every Ray pod of it selected,
    and port 8265 (the job API) reachable only from the service's own pods and the KubeRay operator."""
    spec = ray_cluster_spec(objects[("RayService", service)])
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    problems = []
    policies = [o for (kind, _), o in objects.items() if kind == "NetworkPolicy"
                and o["metadata"].get("namespace") == objects[("RayService", service)]["metadata"].get("namespace")]
    guarding = []
    for pol in policies:
        want = pol["spec"].get("podSelector", {}).get("matchLabels", {})
        if want and all(all(_pod_labels(t).get(k) == v for k, v in want.items()) for t in templates):
            guarding.append(pol)
    if not guarding:
        return [f"{service}: no NetworkPolicy selects all its Ray pods (the dashboard is open to the cluster)"]
    for pol in guarding:
        if "Ingress" not in pol["spec"].get("policyTypes", ["Ingress"]):
            problems.append(f"{pol['metadata']['name']}: does not restrict ingress")
        own = pol["spec"]["podSelector"]["matchLabels"]
        for rule in pol["spec"].get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            opens_dashboard = not ports or 8265 in ports or "dashboard" in ports
            if not opens_dashboard:
                continue
            sources = rule.get("from")
            if not sources:
                problems.append(f"{pol['metadata']['name']}: port 8265 open to every source")
                continue
            for src in sources:
                labels = src.get("podSelector", {}).get("matchLabels", {})
                if "ipBlock" in src or not labels:
                    problems.append(f"{pol['metadata']['name']}: port 8265 open to {src}")
                elif labels != own and labels.get("app.kubernetes.io/name") != "kuberay-operator":
                    problems.append(f"{pol['metadata']['name']}: port 8265 open to pods {labels}")
    return problems


def test_rayservice_dashboard_reachable_only_by_the_operator_and_its_own_pods(objects):
    assert dashboard_exposure(objects, "loopy-sampler") == []
    (pol,) = [o for (kind, _), o in objects.items() if kind == "NetworkPolicy"]
    assert any(8000 in {p.get("port") for p in r.get("ports", [])} and "from" not in r for r in pol["spec"]["ingress"])


def test_dashboard_exposure_check_catches_an_open_port_and_unselected_pods(objects):
    import copy

    opened = copy.deepcopy(objects)
    (key,) = [k for k in opened if k[0] == "NetworkPolicy"]
    opened[key]["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8265}]})
    assert any("every source" in p for p in dashboard_exposure(opened, "loopy-sampler"))
    unlabelled = copy.deepcopy(objects)
    spec = ray_cluster_spec(unlabelled[("RayService", "loopy-sampler")])
    spec["workerGroupSpecs"][0]["template"]["metadata"]["labels"] = {}
    assert any("no NetworkPolicy" in p for p in dashboard_exposure(unlabelled, "loopy-sampler"))
    cluster_wide = copy.deepcopy(objects)
    cluster_wide[key]["spec"]["ingress"][1]["from"] = [{"namespaceSelector": {}}]
    assert any("open to" in p for p in dashboard_exposure(cluster_wide, "loopy-sampler"))
