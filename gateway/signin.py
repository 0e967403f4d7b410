"""Sign-in with OpenID Connect: who may come in, and as what. No HTTP framework here.

``OidcClient`` runs the authorization code flow with PKCE (S256) against any provider named by
its issuer URL, through Authlib: the provider's metadata and keys come from its discovery
document; the ID token's signature is checked against the provider's JWKS, and its issuer,
audience, expiry and nonce against what this server expects. ``admit`` decides what an email
becomes (admin, approved or pending); ``sign_in`` records it on the user's row.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass

from authlib.integrations.base_client.sync_app import BaseApp, OAuth2Mixin
from authlib.integrations.base_client.sync_openid import OpenIDMixin
from authlib.integrations.requests_client import OAuth2Session
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway import tokens
from gateway.models import ApiToken, User

log = logging.getLogger("kgpu.signin")

PERSONAL_TOKEN_LABEL = "signed in"


class SignInError(Exception):
    """The sign-in cannot go on: a mismatched state, a refused or forged answer, a bad ID token.
    The message is safe to show the person; it names no secret."""


@dataclass(frozen=True)
class Identity:
    email: str
    name: str
    subject: str


@dataclass(frozen=True)
class PendingSignIn:
    """What must survive the trip to the provider and back (kept in a signed, short-lived cookie)."""

    url: str  # where to send the browser
    state: str
    nonce: str
    code_verifier: str


class _AuthlibApp(OAuth2Mixin, OpenIDMixin, BaseApp):
    """Authlib's framework-free OAuth 2 / OpenID client, over requests."""

    client_cls = OAuth2Session


class OidcClient:
    def __init__(self, issuer: str, client_id: str, client_secret: str, scopes: str = "openid email profile",
                 timeout_s: float = 10.0):
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self._app = _AuthlibApp(
            framework=None,
            client_id=client_id,
            client_secret=client_secret,
            server_metadata_url=f"{self.issuer}/.well-known/openid-configuration",
            client_kwargs={"scope": scopes, "code_challenge_method": "S256", "default_timeout": timeout_s},
        )

    def _metadata(self) -> dict:
        try:
            metadata = self._app.load_server_metadata()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the provider is the same to the person
            log.warning("the sign-in provider %s did not answer its discovery document: %s", self.issuer, exc)
            raise SignInError("the sign-in provider cannot be reached; try again in a moment") from None
        if metadata.get("issuer", "").rstrip("/") != self.issuer:
            raise SignInError("the sign-in provider's discovery document names another issuer")
        return metadata

    def begin(self, redirect_uri: str) -> PendingSignIn:
        self._metadata()
        started = self._app.create_authorization_url(
            redirect_uri, state=secrets.token_urlsafe(24), nonce=secrets.token_urlsafe(24)
        )
        return PendingSignIn(started["url"], started["state"], started["nonce"], started["code_verifier"])

    def finish(self, pending: PendingSignIn, redirect_uri: str, *, state: str, code: str) -> Identity:
        """The person back from the provider with ``state`` and ``code``: exchange the code (with the
        PKCE verifier), verify the ID token, and say who it is."""
        if not state or not hmac.compare_digest(state.encode(), pending.state.encode()):
            raise SignInError("the sign-in answer does not belong to this browser's sign-in (state mismatch)")
        if not code:
            raise SignInError("the sign-in provider sent no authorization code")
        self._metadata()
        try:
            token = self._app.fetch_access_token(redirect_uri, code=code, code_verifier=pending.code_verifier)
        except Exception as exc:  # noqa: BLE001 - the provider refused the code (reused, expired, bad verifier)
            log.info("the sign-in provider refused the code: %s", type(exc).__name__)
            raise SignInError("the sign-in provider refused the authorization code") from None
        return self.verify_id_token(token, pending.nonce)

    def verify_id_token(self, token: dict, nonce: str) -> Identity:
        if "id_token" not in token:
            raise SignInError("the sign-in provider sent no ID token")
        try:
            claims = self._app.parse_id_token(
                token, nonce, claims_options={
                    "iss": {"essential": True, "value": self.issuer},
                    "aud": {"essential": True, "value": self.client_id},
                },
            )
        except Exception as exc:  # noqa: BLE001 - signature, issuer, audience, expiry, nonce: all refusals
            log.info("an ID token was refused: %s", exc)
            raise SignInError(f"the ID token was refused ({exc})") from None
        if not claims.get("email") and token.get("access_token"):
            claims = self._with_userinfo(dict(claims), token)
        email = str(claims.get("email") or "").strip().lower()
        if not email or "@" not in email:
            raise SignInError("the sign-in provider did not say your email address (ask for the 'email' scope)")
        if claims.get("email_verified") is False:
            raise SignInError("the sign-in provider says your email address is not verified")
        return Identity(email=email, name=str(claims.get("name") or ""), subject=str(claims["sub"]))


    def _with_userinfo(self, claims: dict, token: dict) -> dict:
        """Providers that keep the ID token small (oidc-provider, some Keycloak setups) tell the
        email at the userinfo endpoint; its answer counts only for the ID token's subject."""
        try:
            info = self._app.userinfo(token=token)
        except Exception as exc:  # noqa: BLE001
            log.info("the userinfo endpoint did not answer: %s", type(exc).__name__)
            raise SignInError("the sign-in provider did not tell who you are (userinfo)") from None
        if str(info.get("sub")) != str(claims.get("sub")):
            raise SignInError("the sign-in provider's userinfo is about someone else")
        return {**info, **{k: v for k, v in claims.items() if v is not None}}


def _listed(raw: str) -> set[str]:
    return {item.strip().lower() for item in raw.split(",") if item.strip()}


@dataclass(frozen=True)
class AdmissionPolicy:
    """``KGPU_ADMIN_EMAILS``, ``KGPU_ALLOWED_EMAILS`` and ``KGPU_ALLOWED_DOMAINS`` (comma-separated)."""

    admin_emails: frozenset[str]
    allowed_emails: frozenset[str]
    allowed_domains: frozenset[str]

    @classmethod
    def from_lists(cls, admin_emails: str, allowed_emails: str, allowed_domains: str) -> "AdmissionPolicy":
        domains = {domain.lstrip("@") for domain in _listed(allowed_domains)}
        return cls(frozenset(_listed(admin_emails)), frozenset(_listed(allowed_emails)), frozenset(domains))

    def is_admin(self, email: str) -> bool:
        return email in self.admin_emails

    def is_allowed(self, email: str) -> bool:
        domain = email.rpartition("@")[2]
        return self.is_admin(email) or email in self.allowed_emails or domain in self.allowed_domains


def sign_in(session: Session, identity: Identity, policy: AdmissionPolicy, starting_credits: int) -> User:
    """The user who just proved this email: created on first sign-in (approved if allowlisted,
    else pending); an existing pending user becomes approved once the allowlist names them;
    admin emails are admins. A suspended user stays suspended: only an admin lifts that."""
    user = session.scalar(select(User).where(User.email == identity.email))
    if user is None:
        user = User(email=identity.email, name=identity.name[:200], role="user", status="pending",
                    credits=starting_credits)
        session.add(user)
    if user.status == "pending" and policy.is_allowed(identity.email):
        user.status = "approved"
    if policy.is_admin(identity.email) and user.status != "suspended":
        user.role = "admin"
    if not user.name and identity.name:
        user.name = identity.name[:200]
    session.flush()
    return user


def live_personal_token(session: Session, user_id: int) -> ApiToken | None:
    """The user's newest live account token (not an in-pod one), if any."""
    rows = session.scalars(
        select(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.rental_id.is_(None), ApiToken.revoked_at.is_(None))
        .order_by(ApiToken.id.desc())
    )
    return next((row for row in rows if tokens.is_live(row)), None)


def reissue_personal_token(session: Session, user_id: int) -> tuple[ApiToken, str]:
    """Revoke the user's account tokens (in-pod tokens live on with their rentals) and issue one."""
    revoke_personal_tokens(session, user_id)
    return tokens.issue(session, user_id, label=PERSONAL_TOKEN_LABEL)


def revoke_personal_tokens(session: Session, user_id: int) -> int:
    revoked = 0
    for row in session.scalars(
        select(ApiToken).where(ApiToken.user_id == user_id, ApiToken.rental_id.is_(None), ApiToken.revoked_at.is_(None))
    ):
        revoked += tokens.revoke(session, row.id)
    return revoked
