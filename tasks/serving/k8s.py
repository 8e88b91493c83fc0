"""Kubernetes manifests for an endpoint revision: a KubeRay RayService, and a Deployment + Service for one replica.

The RayService's `serveConfigV2` is the Serve config the `ray` target deploys (`tasks/serving/ray.py`), rendered
by the same function from the same `VllmArgs`; only paths change: weights are read from a volume mounted at
`/models`, and the cluster's Python is the image's. Nothing here talks to a cluster (none can be had where the
tests run): `validate_manifests` checks the built-in kinds against the Kubernetes JSON schemas
(`kubernetes-validate`), and the RayService, a custom resource those schemas lack, against this module's own
pydantic models of the KubeRay fields it uses (its pod templates still go through the Pod schema).
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tasks.core.errors import ConfigError
from tasks.serving.base import VllmArgs
from tasks.serving.ray import Device, RaySettings, app_config, deploy_config, runtime_env_vars

DEFAULT_IMAGE = "vllm/vllm-openai:v0.32.0"
RAY_VERSION = "2.60.0"
MODELS_MOUNT = "/models"
SERVE_PORT = 8000
METRICS_PORT = 8080  # Ray's metrics export port, which KubeRay sets on every Ray pod
K8S_VERSION = "1.33.0"  # schemas kubernetes-validate checks against (it ships 1.25-1.37)
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class K8sOptions(BaseModel):
    """What `llmhost render k8s` lets a user set; the rest follows from the endpoint's revision."""

    model_config = {"extra": "forbid"}

    image: str = Field(default=DEFAULT_IMAGE, description="Container image with vLLM (and ray[serve] for Ray pods).")
    namespace: str = Field(default="default", pattern=_DNS1123.pattern)
    models_pvc: str | None = Field(default=None, description="PVC holding the weights; None = <name>-models.")
    storage_class: str | None = Field(default=None, description="StorageClass of the rendered PVC; None = default.")
    models_size: str = Field(default="50Gi", pattern=r"^\d+(Ki|Mi|Gi|Ti)$", description="Size of the rendered PVC.")
    code_uri: str | None = Field(
        default=None,
        description="py_modules URI of llmhost_serve/ (https://.../llmhost_serve.zip); None = the image has it.",
    )
    cpu: str = Field(default="4", description="CPU request of a replica pod.")
    memory: str = Field(default="16Gi", description="Memory request (and limit) of a replica pod.")


def k8s_name(name: str) -> str:
    """An endpoint name as a DNS-1123 label (Kubernetes object names)."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].strip("-")
    if not out or not _DNS1123.match(out):
        raise ConfigError("name", name, "use an endpoint name with letters or digits (it becomes a Kubernetes name)")
    return out


def pod_args(args: VllmArgs, model_version: str) -> VllmArgs:
    """The same vLLM args with every local path moved under the models volume, where the pod reads them."""
    base = PurePosixPath(MODELS_MOUNT)
    updates: dict[str, Any] = {"model": str(base / model_version.replace("/", "-"))}
    if args.lora_modules:
        updates["lora_modules"] = {k: str(base / "adapters" / k) for k in args.lora_modules}
    if args.chat_template:
        updates["chat_template"] = str(base / "templates" / PurePosixPath(args.chat_template).name)
    return args.model_copy(update=updates)


def _lora(args: VllmArgs) -> bool:
    return args.enable_lora or bool(args.lora_modules)


def _gpus(device: str, args: VllmArgs) -> int:
    return args.tensor_parallel_size if device == "gpu" else 0


def _resources(opts: K8sOptions, gpus: int) -> dict[str, Any]:
    req: dict[str, Any] = {"cpu": opts.cpu, "memory": opts.memory}
    lim: dict[str, Any] = {"memory": opts.memory}
    if gpus:
        # The device plugin hands out whole GPUs: request and limit must be equal.
        req["nvidia.com/gpu"] = lim["nvidia.com/gpu"] = gpus
    return {"requests": req, "limits": lim}


def _volumes(name: str, opts: K8sOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    claim = opts.models_pvc or f"{name}-models"
    volumes: list[dict[str, Any]] = [
        {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
        # vLLM's worker processes share tensors through /dev/shm; the container default (64 MiB) is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    return volumes, mounts


def _scrape(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def serve_config(
    args: VllmArgs, *, app: str, settings: RaySettings, device: Device, opts: K8sOptions,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Serve config a RayService runs: the `ray` target's, with Serve on all interfaces of each pod."""
    env = runtime_env_vars(device, vllm_python=None, lora=_lora(args), extra=extra_env)
    a = app_config(args, name=app, settings=settings, device=device, code_uri=opts.code_uri, env=env,
                   startup_timeout_s=1800.0)
    return deploy_config([a], host="0.0.0.0", port=SERVE_PORT)


def render_rayservice(
    *, endpoint: str, revision: str, args: VllmArgs, settings: RaySettings, device: Device,
    opts: K8sOptions, extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A KubeRay RayService: a CPU-only head (GCS, dashboard, Serve controller) and one worker pod per replica."""
    name = k8s_name(endpoint)
    app = f"{name}-{revision[:8]}"
    config = serve_config(args, app=app, settings=settings, device=device, opts=opts, extra_env=extra_env)
    volumes, mounts = _volumes(name, opts)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "llmhost", "llmhost/revision": revision[:12]}
    worker_params: dict[str, str] = {}
    if settings.resources:
        # A worker pod offers exactly one replica's custom resources, so the spec's placement rules hold per pod.
        worker_params["resources"] = json.dumps(json.dumps(settings.resources))
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # no replica on the head
        "template": {
            "metadata": {"labels": labels, "annotations": _scrape(METRICS_PORT)},
            "spec": {"containers": [{
                "name": "ray-head",
                "image": opts.image,
                "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"},
                          {"containerPort": METRICS_PORT, "name": "metrics"}],
                "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
                # Serve's proxy answers /-/healthz once it routes; the Service only sends traffic to a ready head.
                "readinessProbe": {"httpGet": {"path": "/-/healthz", "port": SERVE_PORT},
                                   "periodSeconds": 5, "failureThreshold": 3},
            }]},
        },
    }
    worker = {
        "groupName": "vllm",
        "replicas": settings.min_replicas,
        "minReplicas": settings.min_replicas,
        "maxReplicas": settings.ceiling,
        "rayStartParams": worker_params,
        "template": {
            "metadata": {"labels": labels, "annotations": _scrape(METRICS_PORT)},
            "spec": {
                "containers": [{
                    "name": "ray-worker",
                    "image": opts.image,
                    "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
                    "resources": _resources(opts, _gpus(device, args)),
                    "volumeMounts": mounts,
                }],
                "volumes": volumes,
            },
        },
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels},
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Serve's autoscaler asks for replicas; the in-tree autoscaler turns them into worker pods.
                "enableInTreeAutoscaling": settings.ceiling > settings.min_replicas,
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


def render_deployment(
    *, endpoint: str, revision: str, args: VllmArgs, device: Device, opts: K8sOptions,
    extra_env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A Deployment of one vLLM server (no KubeRay) and the Service in front of it."""
    name = k8s_name(endpoint)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "llmhost"}
    volumes, mounts = _volumes(name, opts)
    env = runtime_env_vars(device, vllm_python=None, lora=_lora(args), extra=extra_env)
    container = {
        "name": "vllm",
        "image": opts.image,
        # The module, not the image's `vllm serve` entrypoint: the same command line the local target runs.
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": [*args.to_cli(), "--host", "0.0.0.0", "--port", str(SERVE_PORT)],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"containerPort": SERVE_PORT, "name": "http"}],
        "resources": _resources(opts, _gpus(device, args)),
        "readinessProbe": {"httpGet": {"path": "/health", "port": SERVE_PORT}, "periodSeconds": 5,
                           "failureThreshold": 3},
        # Loading weights takes minutes on big models: liveness waits for the first readiness, not a fixed delay.
        "startupProbe": {"httpGet": {"path": "/health", "port": SERVE_PORT}, "periodSeconds": 10,
                         "failureThreshold": 180},
        "livenessProbe": {"httpGet": {"path": "/health", "port": SERVE_PORT}, "periodSeconds": 15,
                          "failureThreshold": 4},
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": opts.namespace,
                     "labels": {**labels, "llmhost/revision": revision[:12]}},
        "spec": {
            "replicas": 1,
            # One GPU set, one server: the old pod goes before the new one can claim the GPUs.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": _scrape(SERVE_PORT)},
                "spec": {"containers": [container], "volumes": volumes},
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": SERVE_PORT, "targetPort": "http"}]},
    }
    return [deployment, service]


def render_pvc(endpoint: str, opts: K8sOptions) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": opts.models_size}}}
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": opts.models_pvc or f"{k8s_name(endpoint)}-models", "namespace": opts.namespace},
            "spec": spec}


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML for kubectl and for reading: no anchors for shared dicts, multi-line strings as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str)


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    """A multi-document YAML file, the embedded Serve config readable as the YAML it is."""
    return yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False)


# ---------------------------------------------------------------------------------------------- validation


class _Strict(BaseModel):
    model_config = {"extra": "forbid"}


class ObjectMeta(BaseModel):
    name: str = Field(pattern=_DNS1123.pattern, max_length=63)
    namespace: str | None = Field(default=None, pattern=_DNS1123.pattern)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodTemplate(_Strict):
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: dict[str, Any]


class HeadGroupSpec(_Strict):
    rayStartParams: dict[str, str] = Field(default_factory=dict, description="KubeRay takes string values only.")
    template: PodTemplate
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None


class WorkerGroupSpec(_Strict):
    groupName: str = Field(pattern=_DNS1123.pattern)
    replicas: int = Field(ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=1)
    rayStartParams: dict[str, str] = Field(default_factory=dict)
    template: PodTemplate

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroupSpec:
        if not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(f"replicas={self.replicas} must lie in [minReplicas={self.minReplicas}, "
                             f"maxReplicas={self.maxReplicas}]")
        return self


class RayClusterSpec(_Strict):
    rayVersion: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    enableInTreeAutoscaling: bool = False
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(min_length=1)


class ServeDeployment(BaseModel):
    name: str
    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)


class ServeApplication(BaseModel):
    name: str
    route_prefix: str = Field(pattern=r"^/")
    import_path: str = Field(pattern=r"^[\w.]+:[\w]+$")
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    args: dict[str, Any] = Field(default_factory=dict)
    deployments: list[ServeDeployment] = Field(default_factory=list)


class ServeConfigV2(BaseModel):
    applications: list[ServeApplication] = Field(min_length=1)
    http_options: dict[str, Any] = Field(default_factory=dict)
    proxy_location: str | None = None


class RayServiceSpec(_Strict):
    serveConfigV2: str = Field(description="A Serve config as a YAML string (what `serve deploy` takes).")
    rayClusterConfig: RayClusterSpec

    @field_validator("serveConfigV2")
    @classmethod
    def _serve_config(cls, v: str) -> str:
        ServeConfigV2.model_validate(yaml.safe_load(v))
        return v


class RayServiceManifest(_Strict):
    """The KubeRay `ray.io/v1` RayService fields llmhost writes (a structural check, not the CRD's own schema)."""

    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: ObjectMeta
    spec: RayServiceSpec


def _pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


def validate_manifest(doc: dict[str, Any], *, version: str = K8S_VERSION) -> None:
    """Raises ConfigError naming the manifest, the field and the problem; built-in kinds are checked strictly."""
    import kubernetes_validate

    kind = doc.get("kind", "?")
    name = (doc.get("metadata") or {}).get("name", "?")
    docs: list[dict[str, Any]] = [doc]
    if kind == "RayService":
        try:
            rs = RayServiceManifest.model_validate(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise ConfigError(field, err.get("input"), err["msg"], source=f"RayService/{name}") from None
        cluster = rs.spec.rayClusterConfig
        docs = [_pod(cluster.headGroupSpec.template.model_dump(), f"{name}-head")]
        docs += [_pod(w.template.model_dump(), f"{name}-{w.groupName}") for w in cluster.workerGroupSpecs]
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(root)"
            where = f"{kind}/{name}" + (f" (pod template {d['metadata']['name']})" if d is not doc else "")
            raise ConfigError(path, exc.instance, exc.message, source=where) from None


def validate_manifests(docs: list[dict[str, Any]]) -> None:
    for d in docs:
        validate_manifest(d)


# ---------------------------------------------------------------------------------------------- an endpoint


def render_endpoint(
    *, endpoint: str, revision: str, args: VllmArgs, model_version: str, settings: RaySettings, device: Device,
    opts: K8sOptions, extra_env: dict[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """File name -> manifests for a revision's vLLM args; validated, so what is returned can be applied as it is.

    `args` are the revision's local args (`pod_args` moves their paths under the models volume, at
    `model_version`); `settings` are its Ray Serve settings. Always a RayService (KubeRay) and the PVC its pods
    read weights from; for an endpoint of one replica also a plain Deployment + Service, which need no operator.
    """
    pod = pod_args(args, model_version)
    files: dict[str, list[dict[str, Any]]] = {
        "models-pvc.yaml": [render_pvc(endpoint, opts)],
        "rayservice.yaml": [render_rayservice(endpoint=endpoint, revision=revision, args=pod, settings=settings,
                                              device=device, opts=opts, extra_env=extra_env)],
    }
    if settings.ceiling == 1:
        files["deployment.yaml"] = render_deployment(endpoint=endpoint, revision=revision, args=pod, device=device,
                                                     opts=opts, extra_env=extra_env)
    for docs in files.values():
        validate_manifests(docs)
    return files
