"""The Segment-compatible HTTP ingest API in front of a ``Router``.

``create_app(router)`` builds the aiohttp application, ``create_runner(app)`` the runner it must
be served with, and ``run.serve(config_path)`` is ``router serve``.
"""

from router.server.app import create_app, create_runner

__all__ = ["create_app", "create_runner"]
