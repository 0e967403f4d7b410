"""Where pods reach this host: the gateway (KGPU_API_BASE) and the embedded object store.

Docker pods on a bridge network (the default) reach the host at the bridge's gateway
address (172.17.0.1 on docker's default bridge), not at 127.0.0.1. With no address
configured, ``kgpu serve`` then also listens there, the embedded store listens there, and
pods are told ``http://{bridge address}:{port}``. Pods on the host network, and the local
backend, reach 127.0.0.1: nothing to do. Slurm pods run on other machines: they reach this
host at its address on the cluster's network (KGPU_SLURM_GATEWAY_ADDRESS), used the same way.
"""

from __future__ import annotations

import ipaddress
import logging

from gateway.settings import Settings

log = logging.getLogger(__name__)


def docker_bridge_address(network: str) -> str | None:
    """The host's address on a docker bridge network, or None (no docker, or not a bridge)."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            config = client.networks.get(network).attrs["IPAM"]["Config"][0]
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown": the loopback defaults stay
        log.warning("cannot read docker network %s: %s", network, exc)
        return None
    # docker gives the host the subnet's first address, and does not always say so.
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


def pod_host_address(settings: Settings) -> str | None:
    """The address pods must use to reach this host, where it is not 127.0.0.1."""
    if settings.pod_backend == "slurm":  # this host's address on the cluster's network, as configured
        return settings.slurm_gateway_address or None
    if settings.pod_backend != "docker" or settings.docker_network == "host":
        return None
    return docker_bridge_address(settings.docker_network or "bridge")
