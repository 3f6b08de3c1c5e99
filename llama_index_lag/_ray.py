"""Ray, the optional distributed engine (``pip install "llama-index-lag[ray]"``): import it or say how to
install it, and connect to a cluster for the duration of a job."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)
INSTALL = 'pip install "llama-index-lag[ray]"'


def require_ray() -> Any:
    """The ``ray`` module, or :class:`MissingDependencyError` with the install command."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"building or compiling on Ray needs Ray: {INSTALL}") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """Connect to Ray for the block: ``"auto"`` (or None) joins the cluster this machine belongs to
    (``ray start`` / ``RAY_ADDRESS``) or else starts a local one with this machine's cores; any other value
    is a cluster address (``HOST:PORT`` or ``ray://HOST:PORT``). A connection this process already holds is
    reused; one opened here is closed at the end. Yields the ``ray`` module."""
    ray = require_ray()
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ConfigError(f"ray address must be 'auto' or HOST:PORT, got {address!r}", field="ray_address")
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    target = None if address in (None, "auto") else address
    if target is None and not os.environ.get("RAY_ADDRESS"):
        with contextlib.suppress(ConnectionError, RuntimeError):  # a `ray start` cluster on this machine
            ray.init(address="auto", **kwargs)
    try:
        if not ray.is_initialized():
            ray.init(address=target, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {exc}",
                          field="ray_address") from None
    logger.info("Ray: %s", ray.cluster_resources())
    try:
        yield ray
    finally:
        ray.shutdown()
