"""``loraloom serve``: run the server app in this process with uvicorn, or as Ray Serve replicas.

Kept apart from ``app.py`` so that the app and its replicas never import each other: app <- replicas <- launch.
"""

from __future__ import annotations

from .app import build_app
from .options import ServeOptions

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(options: ServeOptions) -> None:
    """Run the server until interrupted (``options.ray_replicas`` >= 1: with Ray Serve)."""
    if options.host not in LOOPBACK and not options.api_key:
        print(f"loraloom: warning: serving on {options.host} without --api-key: anyone who reaches it can use it")
    if options.ray_replicas:
        from .replicas import serve_replicas

        serve_replicas(options)
        return
    import uvicorn

    app = build_app(options)
    print(f"loraloom: serving {options.base} (adapters: {options.adapters}) on http://{options.host}:{options.port}")
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")


__all__ = ["serve"]
