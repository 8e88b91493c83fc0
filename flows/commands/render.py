"""`llmhost render k8s ENDPOINT`: Kubernetes manifests (KubeRay RayService, or Deployment + Service) for an endpoint."""

from __future__ import annotations

from pathlib import Path

import typer

render_app = typer.Typer(help="Render an endpoint for another platform.", no_args_is_help=True)


@render_app.command("k8s")
def k8s(
    endpoint: str = typer.Argument(..., help="A spec YAML (deployments/demo-ray.yaml) or a deployed endpoint's name."),
    out: Path = typer.Option(None, "--out", help="Folder to write into; default k8s/<endpoint>/."),
    image: str = typer.Option(None, "--image", help="Container image; default vllm/vllm-openai:v0.32.0."),
    namespace: str = typer.Option("default", "--namespace", "-n"),
    models_pvc: str = typer.Option(None, "--models-pvc", help="A PVC with the weights; default <name>-models."),
    storage_class: str = typer.Option(None, "--storage-class", help="StorageClass of the rendered PVC."),
    models_size: str = typer.Option("50Gi", "--models-size", help="Size of the rendered PVC."),
    code_uri: str = typer.Option(
        None, "--code-uri", help="URI of a zip of llmhost_serve/ for Ray's py_modules; default: the image has it."
    ),
    cpu: str = typer.Option("4", "--cpu", help="CPU request of a replica pod."),
    memory: str = typer.Option("16Gi", "--memory", help="Memory request and limit of a replica pod."),
) -> None:
    """Write validated manifests for the endpoint's revision: the same Serve config the `ray` target deploys."""
    from pydantic import ValidationError

    from tasks import store
    from tasks.core.errors import ConfigError
    from tasks.deploy import load_spec, pinned_spec, plan_revision, render_k8s
    from tasks.serving.k8s import DEFAULT_IMAGE, K8sOptions, dump_manifests, k8s_name

    path = Path(endpoint)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        spec = load_spec(path)
    else:
        e = store.get_endpoint(endpoint)
        live = next((r for r in store.list_revisions(endpoint) if r.id == e.live_revision_id), None)
        if live is None:
            raise ConfigError("endpoint", endpoint, "has no live revision; give its spec YAML instead")
        spec = pinned_spec(live)
    try:
        opts = K8sOptions(image=image or DEFAULT_IMAGE, namespace=namespace, models_pvc=models_pvc,
                          storage_class=storage_class, models_size=models_size, code_uri=code_uri, cpu=cpu,
                          memory=memory)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}", err.get("input"), err["msg"]) from None
    plan = plan_revision(spec)
    files = render_k8s(spec, plan, opts)
    folder = out or Path("k8s") / k8s_name(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in files.items():
        (folder / name).write_text(dump_manifests(docs))
        typer.echo(f"wrote {folder / name}: " + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
    typer.echo(
        f"revision {plan.content_hash[:12]} of {spec.name}: copy the weights of {plan.model_version} into the PVC at "
        f"/models/{plan.model_version.replace('/', '-')}, then `kubectl apply -f {folder}` "
        "(the RayService needs the KubeRay operator; its image needs ray[serve]==2.60.0 and llmhost_serve/)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(render_app, name="render")
