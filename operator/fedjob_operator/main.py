"""Run the operator: Kopf with our handlers, Prometheus metrics, standalone (one replica)."""

from __future__ import annotations

import asyncio
import logging

import kopf
from prometheus_client import start_http_server

from fedjob_operator import handlers  # registers the handlers on import

log = logging.getLogger("fedjob.operator")


def run_operator(namespaces: list[str], metrics_port: int, liveness: str | None = None) -> int:
    if metrics_port:
        start_http_server(metrics_port)
    log.info("fedjob operator watching %s", ", ".join(namespaces) if namespaces else "all namespaces")
    loop = handlers.sync_loop()
    loop.start()
    try:
        # One replica at a time (Recreate strategy in the chart): no Kopf peering objects needed.
        asyncio.run(
            kopf.operator(
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces or [],
                liveness_endpoint=liveness,
            )
        )
    finally:
        loop.stop()
    return 0
