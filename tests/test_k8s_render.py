"""`llmhost render k8s`: manifests checked offline against the Kubernetes JSON schemas (kubernetes-validate), the
KubeRay RayService against the project's structural models, and the Serve config compared with the `ray` target's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.core.errors import ConfigError
from tasks.core.settings import PROJECT_ROOT
from tasks.deploy import EndpointSpec, load_spec, plan_revision, render_k8s
from tasks.serving.k8s import K8sOptions, pod_args, validate_manifest
from tasks.serving.ray import RayTarget

SPEC_PATH = PROJECT_ROOT / "deployments" / "demo-ray.yaml"


@pytest.fixture(scope="module")
def demo_version(demo_model_dir: Path) -> str:
    from tasks.core.tracking import mlflow_client
    from tasks.register import register_model

    reg = register_model(f"path:{demo_model_dir}", "demo")
    mlflow_client().set_registered_model_alias("demo", "champion", reg.version)
    return reg.version


def spec_with(**changes: Any) -> EndpointSpec:
    raw = load_spec(SPEC_PATH).model_dump(mode="json")
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return EndpointSpec.model_validate(raw)


def one(files: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    docs = [d for ds in files.values() for d in ds if d["kind"] == kind]
    assert len(docs) == 1, [d["kind"] for ds in files.values() for d in ds]
    return docs[0]


def test_the_rayservice_embeds_the_serve_config_the_ray_target_deploys(demo_version: str):
    spec = load_spec(SPEC_PATH)
    plan = plan_revision(spec)
    files = render_k8s(spec, plan, K8sOptions())  # validates every manifest before returning
    assert set(files) == {"models-pvc.yaml", "rayservice.yaml"}  # 2 replicas: no plain Deployment
    rs = one(files, "RayService")
    assert rs["apiVersion"] == "ray.io/v1" and rs["metadata"]["name"] == "demo-ray"
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert spec.ray is not None
    local = RayTarget(spec.ray).render(pod_args(plan.vllm, plan.model_version), name=app["name"], code_uri=None)
    # The same application the ray target deploys, from the same VllmArgs; only the Python and the host differ.
    assert app["args"]["cli_args"] == local["args"]["cli_args"]
    assert app["args"]["cli_args"][:2] == ["--model", f"/models/{plan.model_version.replace('/', '-')}"]
    assert app["deployments"] == local["deployments"] and app["import_path"] == local["import_path"]
    env = app["runtime_env"]["env_vars"]
    assert "LLMHOST_VLLM_PYTHON" not in env and env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "75"
    assert serve["http_options"]["host"] == "0.0.0.0"
    cluster = rs["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["replicas"], worker["maxReplicas"]) == (2, 2, 2)
    assert worker["rayStartParams"]["resources"] == '"{\\"llmhost_replica\\": 1.0}"'  # KubeRay's quoted JSON
    head = cluster["headGroupSpec"]["template"]
    assert head["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/-/healthz"
    assert head["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    pod = worker["template"]["spec"]
    assert pod["containers"][0]["image"] == "vllm/vllm-openai:v0.32.0"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]  # a CPU tier
    assert {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"] == "demo-ray-models"
    assert one(files, "PersistentVolumeClaim")["metadata"]["name"] == "demo-ray-models"


def test_a_gpu_endpoint_of_one_replica_gets_gpus_and_a_plain_deployment(demo_version: str):
    spec = spec_with(hardware="l4-24gb-x2", ray={"min_replicas": 1, "max_replicas": 1})
    plan = plan_revision(spec)
    assert plan.vllm.tensor_parallel_size == 2  # auto: the tier's GPU count
    files = render_k8s(spec, plan, K8sOptions(image="registry.example/llmhost-vllm:1", namespace="llm"))
    assert set(files) == {"models-pvc.yaml", "rayservice.yaml", "deployment.yaml"}
    worker = one(files, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    res = worker["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 2
    serve = yaml.safe_load(one(files, "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 2
    dep = one(files, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example/llmhost-vllm:1" and dep["metadata"]["namespace"] == "llm"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "VLLM_CPU_KVCACHE_SPACE" not in {e["name"] for e in c["env"]}  # a GPU pod
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    svc = one(files, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_a_manifest_with_an_error_is_caught(demo_version: str):
    spec = spec_with(ray={"min_replicas": 1, "max_replicas": 1})
    files = render_k8s(spec, plan_revision(spec), K8sOptions())
    dep, rs = one(files, "Deployment"), one(files, "RayService")

    def broken(doc: dict[str, Any], change: Any) -> dict[str, Any]:
        d = copy.deepcopy(doc)
        change(d)
        return d

    # Built-in kinds: the Kubernetes schema, strictly (unknown fields too).
    with pytest.raises(ConfigError, match=r"Deployment/demo-ray: spec.replicas='two' is invalid"):
        validate_manifest(broken(dep, lambda d: d["spec"].update(replicas="two")))
    with pytest.raises(ConfigError, match=r"containerPort"):
        validate_manifest(broken(dep, lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].pop(
            "containerPort")))
    with pytest.raises(ConfigError, match=r"volumeMount"):
        validate_manifest(broken(dep, lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
            volumeMount=[])))
    # The RayService: its own structure, its Serve config, and its pod templates through the Pod schema.
    worker = ("spec", "rayClusterConfig", "workerGroupSpecs")
    with pytest.raises(ConfigError, match=r"RayService/demo-ray: .*replicas=1 must lie in \[minReplicas=2"):
        validate_manifest(broken(rs, lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(
            minReplicas=2, maxReplicas=3)))
    with pytest.raises(ConfigError, match=r"rayStartParams.num-cpus=0 is invalid"):
        validate_manifest(broken(rs, lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
                                 .update({"num-cpus": 0})))
    with pytest.raises(ConfigError, match=r"serveConfigV2"):
        validate_manifest(broken(rs, lambda d: d["spec"].update(
            serveConfigV2=d["spec"]["serveConfigV2"].replace("llmhost_serve.replica:build", "not a path"))))
    with pytest.raises(ConfigError, match=r"spec.rayClusterConfg"):
        validate_manifest(broken(rs, lambda d: d["spec"].update(rayClusterConfg={})))
    bad_memory = r"\(pod template demo-ray-vllm\): spec.containers.0.resources.limits.memory=\[16\]"
    with pytest.raises(ConfigError, match=bad_memory):
        validate_manifest(broken(rs, lambda d: d[worker[0]][worker[1]][worker[2]][0]["template"]["spec"]
                                 ["containers"][0]["resources"]["limits"].update(memory=[16])))
    validate_manifest(rs)  # the unbroken one passes


def test_render_k8s_cli_writes_validated_files(demo_version: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]):
    from flows.cli import main

    out = tmp_path / "k8s"
    assert main(["render", "k8s", str(SPEC_PATH), "--out", str(out), "--namespace", "llm"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["models-pvc.yaml", "rayservice.yaml"]
    for p in out.iterdir():
        for doc in yaml.safe_load_all(p.read_text()):
            validate_manifest(doc)  # what was written, read back, still validates
            assert doc["metadata"]["namespace"] == "llm"
    text = capsys.readouterr().out
    assert "RayService/demo-ray" in text and "kubectl apply" in text
    assert main(["render", "k8s", str(SPEC_PATH), "--out", str(out), "--models-size", "50GB"]) == 1
    err = capsys.readouterr().err
    assert "--models-size='50GB' is invalid" in err and len(err.strip().splitlines()) == 1


def test_render_k8s_by_name_renders_the_live_revision(demo_version: str, tmp_path: Path):
    from flows.cli import main
    from tasks import store

    # A live revision as `deploy` records it (no process needed to render it): its pinned spec is what renders.
    spec = spec_with(name="demo-k8s-by-name", ray={"min_replicas": 1, "max_replicas": 1})
    plan = plan_revision(spec)
    store.upsert_endpoint(spec.name, actor="test")
    rev = store.add_revision(spec.name, plan.identity, served_model_name=plan.served_model_name,
                             model_version=plan.model_version, actor="test")
    store.set_live_revision(spec.name, rev.id, actor="test")
    assert main(["render", "k8s", spec.name, "--out", str(tmp_path)]) == 0
    dep = next(yaml.safe_load_all((tmp_path / "deployment.yaml").read_text()))
    assert dep["metadata"]["labels"]["llmhost/revision"] == rev.content_hash[:12]
    assert main(["render", "k8s", "no-such-endpoint", "--out", str(tmp_path)]) == 1
