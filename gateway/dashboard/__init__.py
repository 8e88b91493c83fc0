"""The endpoint dashboard served by the gateway at /ui: endpoints list, Overview, Calling, Usage, Health."""

from gateway.dashboard.routes import Dashboard, mount

__all__ = ["Dashboard", "mount"]
