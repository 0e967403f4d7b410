"""All configuration, read from ``KGPU_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1 << 30
MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KGPU_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # `kgpu serve`'s worker processes on the one port (gateway/serving.py); default: this machine's cores.
    workers: int = Field(default_factory=lambda: len(os.sched_getaffinity(0)), ge=1, le=256)
    data_dir: Path = Path("data")
    # Empty: SQLite in the data directory.
    database_url: str = ""
    # Where clients are told the API lives (KGPU_API_BASE in pods); empty: derived from the request.
    public_base_url: str = ""
    admin_token: str = ""
    # Token lookups are cached this long; revocations through the API clear the cache at once.
    auth_cache_seconds: float = Field(default=2.0, ge=0)
    starting_credits: int = Field(default=1_000_000, ge=0)

    # Object store. An empty endpoint starts the embedded `rclone serve s3` over data_dir/objects.
    s3_endpoint_url: str = ""
    # Where the embedded store listens (port 0: the one kept in data_dir/embedded-s3.json). Empty: 127.0.0.1, or
    # the docker bridge's host address when docker pods run on a bridge (so pods reach it too).
    embedded_s3_host: str = ""
    embedded_s3_port: int = Field(default=0, ge=0, le=65535)
    # The address presigned URLs carry: pods and laptops may reach the store elsewhere than the server.
    s3_public_endpoint_url: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_bucket: str = "kgpu"
    s3_region: str = "us-east-1"
    # Whether the store's ETag of an object stored by one PUT is its MD5 (R2, MinIO, S3 without
    # SSE-KMS or SSE-C): false, and the drive computes MD5s itself. The embedded store's always is.
    s3_put_etag_is_md5: bool = True

    presign_expires_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    user_quota_bytes: int = Field(default=100 * GiB, ge=0)
    # Transit objects (/v1/objects, docs/transit-objects.md): what one user's live objects may hold in all.
    transit_quota_bytes: int = Field(default=100 * GiB, ge=0)
    # How old the stored drive usage may get before a background re-count from the store.
    quota_reconcile_seconds: int = Field(default=600, ge=0)
    # Streamed uploads: the part size of multipart uploads (known length) and for chunked bodies.
    upload_part_bytes: int = Field(default=8 * MiB, ge=5 * MiB)
    upload_unknown_length_part_bytes: int = Field(default=12 * MiB, ge=5 * MiB)  # x 10,000 parts > 100 GiB
    # How long a multipart upload a client sends straight to the store (kgpu cp) may stay open, its
    # size held against the quota; then it is aborted. Under a day: the start-up sweep aborts older ones.
    direct_upload_seconds: int = Field(default=6 * 3600, ge=600, le=20 * 3600)
    # /v1/dav/: WebDAV that serves file bytes itself (GET proxied, PUT streamed) for clients that do
    # not follow redirects (litmus, cadaver, davfs2, desktop clients). Egress through the gateway.
    dav_proxy_enabled: bool = True

    # GPU rentals. Inventory: a JSON list of {"node", "gpu_model", "count", "price_per_hour_credits"};
    # empty: the GPUs nvidia-smi finds on this host, or one CPU-only class where there are none.
    gpu_inventory: str = ""
    gpu_price_per_hour_credits: int = Field(default=500, ge=0)
    cpu_price_per_hour_credits: int = Field(default=100, ge=0)
    pod_backend: str = Field(default="local", pattern="^(local|docker|slurm)$")
    default_image: str = "ghcr.io/vitaldb/kgpu-pytorch:latest"
    # docker backend: the network pods join (empty: docker's default bridge, where pods reach the
    # host at its bridge address, which `kgpu serve` and the embedded store then also listen on;
    # "host": pods share the host's network and reach 127.0.0.1), and whether to pull images.
    docker_network: str = ""
    docker_pull: bool = True
    # slurm backend (docs/slurm.md): each pod is a batch job whose script runs its container with docker
    # on the allocated node. slurm.conf (empty: $SLURM_CONF or Slurm's default), the partition (empty:
    # the cluster's default), job and container names ({prefix}-{rental id}), where a node's GPU device
    # files are ("{node}" is replaced by its name; dummy files on the test cluster), whether docker on
    # the nodes gives GPUs through the NVIDIA runtime (--gpus) instead, the GPU model of a GRES with no
    # type, and the docker network and pulling on the nodes.
    slurm_conf: str = ""
    slurm_partition: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")
    slurm_job_prefix: str = Field(default="kgpu", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    slurm_gpu_device_dir: str = "/dev"
    slurm_nvidia_runtime: bool = False
    slurm_gpu_model: str = Field(default="gpu", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    slurm_docker_network: str = ""
    slurm_pull: bool = True
    # Pod files and SSH sessions without a terminal travel on a connection of their own from the node
    # back to the gateway (docs/slurm.md); false: over srun's stdio (slow), where the nodes cannot
    # connect to the gateway's host.
    slurm_direct_channel: bool = True
    # This host's address on the cluster's network, where pods on the nodes reach the gateway and the
    # embedded store (`kgpu serve` then also listens there, as for docker pods on a bridge); empty: pods
    # are told KGPU_POD_API_BASE / the public URL, or the address the rent request came to.
    slurm_gateway_address: str = ""
    # local backend: mount /shared and /files for each pod (kgpu-bootstrap on the host, the mounts
    # bound into the bubblewrap sandbox); needs bubblewrap, /dev/fuse and fusermount3.
    local_pod_mounts: bool = True
    # local backend: each pod runs under a host uid of its own from this range (the server runs as
    # root). Without root or bubblewrap the backend refuses to rent, unless this declares that one
    # trusted person uses the server (then pods share the server's uid and network: no isolation).
    local_pod_uid_base: int = Field(default=900_000, ge=1000, le=4_000_000_000)
    local_pod_uid_count: int = Field(default=65_536, ge=1, le=1_000_000)
    local_trusted_single_user: bool = False
    # KGPU_API_BASE as pods see it; empty: public_base_url, else the address the rent request came to.
    pod_api_base: str = ""
    # On return, how long the pod may take to upload what /files still holds before it is removed.
    pod_flush_timeout_seconds: int = Field(default=60, ge=1, le=600)
    pod_pids_limit: int = Field(default=4096, ge=32, le=4_194_304)
    max_gpus_per_user: int = Field(default=4, ge=0)
    idle_warning_seconds: int = Field(default=3600, ge=1)
    idle_return_seconds: int = Field(default=7200, ge=1)
    reaper_interval_seconds: float = Field(default=15, gt=0)
    reaper_observe_timeout_seconds: float = Field(default=10, gt=0)
    # One process reaps a pod backend's rentals at a time (gateway/leases.py); another takes over
    # this long after it dies.
    reaper_lease_seconds: float = Field(default=20, ge=1)
    run_output_tail_bytes: int = Field(default=64 * 1024, ge=1024)
    run_kill_grace_seconds: float = Field(default=5, ge=0)
    # Pod files (docs/pod-files.md): how long a transfer may go without a byte either way before it is ended.
    pod_files_idle_seconds: float = Field(default=60, ge=1, le=3600)
    # One user's pod-file transfers at once across all their pods, in all of a server's processes; more are refused (429).
    pod_files_per_user: int = Field(default=8, ge=1, le=10_000)

    # The SSH bastion into pods (docs/ssh.md). Port 0: no SSH. The host handed to clients; empty:
    # the host of public_base_url, else the host the request came to. The host key: the key itself
    # or a path to it (replicas share one); empty: one kept in data_dir.
    ssh_port: int = Field(default=2222, ge=0, le=65535)
    ssh_host: str = ""
    ssh_host_key: SecretStr = SecretStr("")
    ssh_max_connections_per_user: int = Field(default=20, ge=1)
    ssh_max_channels_per_connection: int = Field(default=16, ge=1)
    # Failed logins one address may make in a minute before its next connections are refused.
    ssh_auth_failures_per_minute: int = Field(default=30, ge=1)

    # Sign-in to /view (docs/sign-in.md): any OpenID Connect provider by issuer URL; empty: no sign-in.
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: SecretStr = SecretStr("")
    oidc_scopes: str = "openid email profile"
    # Comma-separated. Admin emails are approved admins at sign-in; allowed emails and domains are
    # approved; everyone else who signs in is pending until an admin approves them.
    admin_emails: str = ""
    allowed_emails: str = ""
    allowed_domains: str = ""
    # Signs /view's session cookies; empty: a secret kept in data_dir/session-secret (replicas: set one).
    session_secret: SecretStr = SecretStr("")
    session_max_age_seconds: int = Field(default=12 * 3600, ge=60, le=30 * 24 * 3600)

    # GET /metrics (docs/metrics.md) is on the API's port for admin tokens; with host:port here, also on a
    # listener of its own that asks no token (keep it where only the monitoring can reach it).
    metrics_address: str = Field(default="", pattern=r"^$|^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")

    @property
    def signin_enabled(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'kgpu.db').resolve()}"

    @property
    def metrics_dir(self) -> Path:
        """Where each process of this server keeps its request counts (gateway/traffic.py)."""
        return self.data_dir / "metrics"

    @property
    def slots_dir(self) -> Path:
        """Where the processes of this server hold the slots of their shared caps on calls into
        pods and pod-file transfers (gateway/pods/slots.py)."""
        return self.data_dir / "slots"

    @property
    def uses_embedded_store(self) -> bool:
        return not self.s3_endpoint_url
