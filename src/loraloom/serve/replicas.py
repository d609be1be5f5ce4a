"""``loraloom serve --ray-replicas N``: N copies of the server behind one endpoint, with Ray Serve.

Each replica is a Ray actor that loads the base model and builds the same FastAPI app as the single-process
server (``build_app``), so every endpoint, error and stream behaves the same; Ray Serve's HTTP proxy spreads
requests over the replicas. Each replica batches its own requests and keeps its own adapter cache.
Ray is imported here only, when replicas are asked for.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve

from .app import ServeOptions, build_app

DEPLOYMENT = "loraloom"


@serve.ingress()
class LoraloomReplica:
    """One replica: the app is built in the replica process (the model is never pickled)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.options)


def deploy(options: ServeOptions, *, num_cpus: float = 1.0, blocking: bool = False) -> Any:
    """Start Ray (or join the one named by RAY_ADDRESS), then N replicas on ``options.host:port``.

    Returns the deployment handle; with ``blocking`` runs until interrupted.
    """
    if options.ray_replicas < 1:
        raise ValueError(f"ray_replicas must be >= 1, got {options.ray_replicas}")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": options.host, "port": options.port})
    deployment = serve.deployment(
        LoraloomReplica,
        name=DEPLOYMENT,
        num_replicas=options.ray_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": options.gpus_per_replica},
    )
    return serve.run(deployment.bind(options), name=DEPLOYMENT, route_prefix="/", blocking=blocking)


def serve_replicas(options: ServeOptions) -> None:
    """Run until interrupted (what ``loraloom serve --ray-replicas N`` calls)."""
    print(
        f"loraloom: serving {options.base} with {options.ray_replicas} Ray Serve replicas "
        f"on http://{options.host}:{options.port}"
    )
    try:
        deploy(options, blocking=True)
    finally:
        serve.shutdown()


__all__ = ["DEPLOYMENT", "LoraloomReplica", "deploy", "serve_replicas"]
