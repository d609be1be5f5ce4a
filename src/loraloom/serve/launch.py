"""``loraloom serve``: run the server app in this process with uvicorn, or as Ray Serve replicas.

Kept apart from ``app.py`` so that the app and its replicas never import each other: app <- replicas <- launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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

    class Server(uvicorn.Server):
        """uvicorn, minus the Ctrl-C it raises again after its graceful shutdown: raised inside the event loop,
        it cancels the app's lifespan task and logs a traceback on every clean stop (uvicorn issue 1579)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()  # shut down already: nothing left to raise

    app = build_app(options)
    print(f"loraloom: serving {options.base} (adapters: {options.adapters}) on http://{options.host}:{options.port}")
    Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="info")).run()


__all__ = ["serve"]
