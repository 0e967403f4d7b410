"""/v1/gpus (rent and return) and /v1/balance."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from gateway import billing
from gateway.auth import AccountUser, ApprovedUser, MaybeUser
from gateway.deps import RentalIdPath, RentalsDep, RunsDep, SessionsDep, SettingsDep, services
from gateway.errors import ApiError
from gateway.inventory import CREDITS_PER_DOLLAR
from gateway.models import Rental, User
from gateway.openapi import GPU_NOT_FOUND, POD_DOWN, content, errors, merge

_CREDITS = {"type": "integer"}
CHARGE = {
    "type": "object",
    "required": ["rental_id", "name", "gpu_model", "minutes", "credits"],
    "properties": {
        "rental_id": {"type": "string"}, "name": {"type": "string"}, "gpu_model": {"type": "string"},
        "minutes": _CREDITS, "credits": _CREDITS,
    },
}
BALANCE = {
    "type": "object",
    "required": [
        "balance", "price_per_hour_credits", "starting_credits", "credits_per_dollar", "charged_active", "charges",
    ],
    "properties": {
        "balance": _CREDITS,
        "price_per_hour_credits": {"type": ["integer", "null"]},
        "starting_credits": _CREDITS,
        "credits_per_dollar": _CREDITS,
        "charged_active": _CREDITS,
        "charges": {"type": "array", "items": CHARGE, "description": "your latest 50 rentals' charges, newest first"},
    },
}
from gateway.rentals import ACTIVE, RentRequest, Rentals
from gateway.ssh.keys import BadPublicKey, PinnedKey, mint_pair, parse_public_key

router = APIRouter(tags=["gpus"])


def ssh_key(rentals: Rentals, text: str | None, rental_name: str) -> tuple[PinnedKey | None, str | None]:
    """The key a rental pins: the one given (a 400 unless it is one strong OpenSSH key), else,
    where the bastion runs, a pair minted now (its private half returned once, never kept)."""
    if text is not None:
        try:
            return parse_public_key(text), None
        except BadPublicKey as exc:
            raise ApiError(400, "bad_ssh_key", str(exc)) from None
    if rentals.ssh_door is None:
        return None, None
    private, key = mint_pair(f"kgpu-{rental_name}")
    return key, private


def with_private_key(described: dict, private: str | None) -> dict:
    if private and described.get("ssh_access"):
        described["ssh_access"]["private_key"] = private  # shown this once: the gateway keeps only the public half
    return described


def api_base(request: Request) -> str:
    """KGPU_API_BASE as pods must see it: configured, else this server on the address pods reach
    it at (the docker bridge's, where `kgpu serve` also listens), else as the request came."""
    settings = services(request).settings
    configured = settings.pod_api_base or settings.public_base_url
    if configured:
        return configured.rstrip("/")
    pod_address = services(request).pod_address
    if pod_address:
        return f"{request.url.scheme}://{pod_address}:{request.url.port or settings.port}"
    return str(request.base_url).rstrip("/")


MODELS = {
    "type": "object",
    "required": ["models"],
    "properties": {"models": {"type": "array", "items": {
        "type": "object",
        "required": ["gpu_model", "gpu_total", "gpu_free", "nodes", "price_per_hour_credits"],
        "properties": {
            "gpu_model": {"type": "string"}, "gpu_total": _CREDITS, "gpu_free": _CREDITS, "nodes": _CREDITS,
            "price_per_hour_credits": _CREDITS,
        },
    }}},
}


@router.get(
    "/v1/gpu-models",
    summary="The GPU models on offer (public): per model, GPUs in all, free now, nodes, the lowest price per hour",
    responses=content(200, "the menu", {"application/json": {"schema": MODELS}}),
)
def gpu_models(rentals: RentalsDep, sessions: SessionsDep) -> dict:
    with sessions() as session:
        return {"models": rentals.models(session)}


@router.get(
    "/v1/gpus",
    summary="Cluster summary (public); with a token also your balance and rentals",
    responses=errors(POD_DOWN),
)
def cluster(request: Request, principal: MaybeUser, rentals: RentalsDep, sessions: SessionsDep) -> dict:
    with sessions() as session:
        nodes = rentals.cluster(session)
        reply = {
            "cluster": nodes,
            "active_total": sum(n["gpu_busy"] for n in nodes),
            "price_per_hour_credits": nodes[0]["price_per_hour_credits"] if nodes else None,
            "ssh": services(request).ssh_published,
        }
        mine = principal is not None and principal.user_id is not None and principal.status == "approved"
        starting = [r.id for r in rentals.active_of(session, principal) if rentals.starting(r)] if mine else []
    for rental_id in starting:  # as GET /v1/gpus/{id} does: a starting pod's state now, not at the next tick
        rentals.refresh(rental_id)
    if mine:
        with sessions() as session:
            user = session.get(User, principal.user_id)
            reply["credits"] = {"balance": user.credits}
            reply["my_gpus"] = [rentals.describe(session, r) for r in rentals.active_of(session, principal)]
    return reply


@router.post(
    "/v1/gpus",
    status_code=201,
    summary="Rent a GPU (the image is fixed for the rental's lifetime)",
    responses=errors(
        (402, "insufficient_credits: one hour costs more than your balance"),
        (403, "no_account: the environment admin token cannot rent"),
        (409, "gpu_cap_reached: you hold the most GPUs one user may; or no_capacity: none free right now"),
        (422, "validation_error: the field named, or a gpu_model not offered here"),
        (503, "pods_unavailable: this server cannot isolate pods; or pod_unavailable"),
    ),
)
def rent(
    body: RentRequest, request: Request, principal: AccountUser, rentals: RentalsDep, sessions: SessionsDep
) -> dict:
    if principal.user_id is None:
        raise ApiError(403, "no_account", "the environment admin token cannot rent; use a user's token")
    rentals.check_pods_available()
    key, private = ssh_key(rentals, body.ssh_pubkey, body.name)
    rental = rentals.rent(principal, body, api_base(request), key)
    with sessions() as session:
        return with_private_key(rentals.describe(session, session.get(Rental, rental.id)), private)


class KeyChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ssh_pubkey: str | None = Field(
        default=None, max_length=16384, description="the new public key to pin; omitted: a new pair is minted",
    )


@router.patch(
    "/v1/gpus/{gpu_id}",
    summary="Change a live rental's SSH key: pin the one given, or mint a new pair (its private half returned once)",
    responses=errors(
        (400, "bad_ssh_key: not one OpenSSH public key line of an accepted kind"),
        (403, "pod_token: a pod's own token cannot change its key"),
        GPU_NOT_FOUND,
        (409, "gpu_not_live: the rental has ended; or ssh_key_in_use: another account's rental pins this key"),
    ),
)
def change_key(
    rental_id: RentalIdPath, body: KeyChange, principal: AccountUser, rentals: RentalsDep, sessions: SessionsDep
) -> dict:
    if body.ssh_pubkey is None and rentals.ssh_door is None:
        raise ApiError(409, "ssh_unavailable", "this server runs no SSH bastion (KGPU_SSH_PORT=0): it mints no keys")
    key, private = ssh_key(rentals, body.ssh_pubkey, rental_id)
    rentals.pin_key(principal, rental_id, key)
    with sessions() as session:
        return with_private_key(rentals.describe(session, session.get(Rental, rental_id)), private)


@router.get(
    "/v1/gpus/{gpu_id}",
    summary="A rental's state and its runs (also after it ended)",
    responses=errors(GPU_NOT_FOUND, POD_DOWN),
)
def rental_state(
    rental_id: RentalIdPath, principal: ApprovedUser, rentals: RentalsDep, runs: RunsDep, sessions: SessionsDep
) -> dict:
    with sessions() as session:
        rental = rentals.get(session, principal, rental_id)
        starting = rentals.starting(rental)
    if starting:
        rentals.refresh(rental_id)
    with sessions() as session:
        rental = session.get(Rental, rental_id)
        described = rentals.describe(session, rental)
        ref, active, mine = rental.pod_ref, rental.phase in ACTIVE, rentals.mine(rental)
    described["runs"] = []  # a pod another gateway runs: its runs are asked of that gateway
    if ref and active and mine:
        described["runs"] = runs.in_pod(rental_id, ref)
    return described


@router.delete(
    "/v1/gpus/{gpu_id}",
    summary="Return the GPU: the pod is destroyed",
    responses=errors(GPU_NOT_FOUND),
)
async def return_gpu(
    rental_id: RentalIdPath, principal: ApprovedUser, rentals: RentalsDep, sessions: SessionsDep
) -> dict:
    rental = await run_in_threadpool(rentals.end, principal, rental_id, "returned")

    def describe():
        with sessions() as session:
            return rentals.describe(session, session.get(Rental, rental.id))

    return await run_in_threadpool(describe)


@router.get(
    "/v1/balance",
    summary="Your credits",
    responses=merge(
        content(200, "Your balance and what credits buy", {"application/json": {"schema": BALANCE}}),
        errors((403, "no_account: the environment admin token has no balance")),
    ),
)
def balance(principal: ApprovedUser, rentals: RentalsDep, sessions: SessionsDep, settings: SettingsDep) -> dict:
    if principal.user_id is None:
        raise ApiError(403, "no_account", "the environment admin token has no balance")
    with sessions() as session:
        user = session.get(User, principal.user_id)
        return {
            "balance": user.credits,
            "price_per_hour_credits": rentals.inventory[0].price_per_hour_credits if rentals.inventory else None,
            "starting_credits": settings.starting_credits,
            "credits_per_dollar": CREDITS_PER_DOLLAR,
            "charged_active": sum(
                billing.charged_total(session, r.id) for r in rentals.active_of(session, principal)
            ),
            "charges": billing.recent_charges(session, principal.user_id, principal.rental_id),
        }
