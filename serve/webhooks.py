"""Task webhooks: a task created with ``webhook_url`` gets one signed POST when it is done or failed.

Delivery is at least once and de-duplicable. The task store writes the delivery (an outbox row,
``serve.store.records.Delivery``) in the transaction that finishes the task; any ingress replica's
``WebhookSender`` claims due deliveries under a lease, POSTs them and marks them delivered or
reschedules them with exponential backoff. A sender that dies mid-call leaves its claim to lapse and
the delivery is sent again, with the same ``X-Acestep-Delivery`` id, so receivers drop repeats.

Signature (as Stripe and GitHub do): ``X-Acestep-Signature: t=<unix seconds>,v1=<hex>`` where hex is
HMAC-SHA256 of ``"<t>.<body>"`` under the key's secret; ``verify_signature`` is the receiver's check.

Address rules (against server-side request forgery): only http and https, no credentials in the URL,
and every address the host resolves to must be public: loopback, private, link-local, multicast,
reserved, unspecified and other non-global addresses (IPv4, IPv6 and IPv4-mapped IPv6) are refused
unless ``allow_private``. Checked at submission and again before each attempt (DNS can change), and
the attempt connects to the address just checked (``pinned``), so a name that re-resolves in between
cannot redirect it; redirects are never followed and proxy settings from the environment are ignored.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from serve.logs import extra, log
from serve.store.records import Delivery, TaskStore

SIGNATURE_HEADER = "X-Acestep-Signature"
DELIVERY_HEADER = "X-Acestep-Delivery"
EVENT_HEADER = "X-Acestep-Event"
MAX_URL_LENGTH = 2048

Resolver = Callable[[str, int], List[str]]


class WebhookRefused(ValueError):
    """A webhook URL the address rules refuse; the message says why (never an address it resolved to)."""


def resolve(host: str, port: int) -> List[str]:
    """Every address ``host`` resolves to (scope ids dropped)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]).split("%", 1)[0] for info in infos]


def address_problem(address: str) -> Optional[str]:
    """Why ``address`` may not be called without ``allow_private`` (None: a public address)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def check_url(url: str, allow_private: bool = False, resolver: Resolver = resolve, field: str = "webhook_url"
              ) -> List[str]:
    """The addresses ``url``'s host resolves to; WebhookRefused unless it is an http(s) URL whose
    host resolves only to addresses the rules allow. ``field`` names the URL in the messages (every
    server-side request to a client's URL meets these rules: webhooks and ``upload_url``)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"{field} is at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused(f"{field} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"{field} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused(f"{field} may not carry credentials (user:password@)")
    try:
        addresses = resolver(parts.hostname, port)
    except (OSError, UnicodeError):
        raise WebhookRefused(f"{field}'s host could not be resolved") from None
    if not addresses:
        raise WebhookRefused(f"{field}'s host could not be resolved")
    for address in addresses:
        problem = None if allow_private else address_problem(address)
        if problem is not None:
            raise WebhookRefused(f"{field}'s host resolves to a {problem} address; only public addresses "
                                 "are called (ingress.webhooks.allow_private allows others)")
    return addresses


def pinned(url: str, address: str) -> Tuple[str, Dict[str, str], Dict[str, str]]:
    """(URL, headers, httpx extensions) that call ``address`` itself, so the connection goes where
    the rules were checked even if the name resolves elsewhere a moment later; Host, and for https
    SNI and certificate checks, keep the name."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    name = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return parts._replace(netloc=netloc).geturl(), {"Host": name}, extensions


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Acestep-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300.0,
                     now: Optional[float] = None) -> bool:
    """The receiver's check: ``header`` (``X-Acestep-Signature``) signs these exact ``body`` bytes
    with ``secret`` and its timestamp is within ``tolerance_s`` of ``now`` (refuses replays).
    Self-contained (hashlib, hmac, time) so that receivers can copy it."""
    items: Dict[str, List[str]] = {}
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        items.setdefault(name, []).append(value)
    try:
        timestamp = int(items["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, given) for given in items.get("v1", []))


class WebhookSecrets:
    """The signing secret of each API key's deliveries: its own (``secrets_file``) or the server's."""

    def __init__(self, server: Optional[str] = None, per_key: Optional[Mapping[str, str]] = None):
        self.server, self.per_key = server or None, dict(per_key or {})

    @classmethod
    def load(cls, settings, env: Mapping[str, str] = os.environ) -> "WebhookSecrets":
        per_key = {}
        if settings.secrets_file:
            with open(settings.secrets_file, encoding="utf-8") as handle:
                for number, line in enumerate(handle.read().splitlines(), start=1):
                    text = line.strip()
                    if not text or text.startswith("#"):
                        continue
                    name, colon, secret = text.partition(":")
                    if not colon or not name.strip() or not secret.strip():
                        raise ValueError(f"{settings.secrets_file} line {number}: expected keyname:secret")
                    per_key[name.strip()] = secret.strip()
        return cls(env.get(settings.secret_env, "").strip(), per_key)

    def for_key(self, key_name: str) -> Optional[str]:
        return self.per_key.get(key_name or "") or self.server


def encode(payload: Dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


class WebhookSender:
    """Sends the store's due deliveries from one ingress replica (``settings``:
    ``serve.config.WebhookSettings``); ``wall`` gives the signature's timestamps."""

    def __init__(self, store: TaskStore, settings, secrets: WebhookSecrets, owner: str, batch: int = 16,
                 wall: Callable[[], float] = time.time, resolver: Resolver = resolve):
        self.store, self.settings, self.secrets, self.owner = store, settings, secrets, owner
        self.batch, self.wall, self.resolver = batch, wall, resolver
        self._pumping: Optional[asyncio.Task] = None
        self._again = False
        self.counts = {"delivered": 0, "failed_attempts": 0, "abandoned": 0}

    async def check_submission(self, url: str, key_name: str) -> None:
        """WebhookRefused when a task may not name ``url``: the address rules, or no secret to sign with."""
        if self.secrets.for_key(key_name) is None:
            raise WebhookRefused("this server has no webhook secret configured, so it cannot sign deliveries")
        await asyncio.to_thread(check_url, url, self.settings.allow_private, self.resolver)

    def kick(self) -> None:
        """Pump soon (called by the reaper's period and when a task finishes): a kick while a pump
        runs makes it pass once more, since what it finished may have been written after its claim."""
        self._again = True
        if self._pumping is None or self._pumping.done():
            self._pumping = asyncio.get_running_loop().create_task(self._pump_safely(), context=contextvars.Context())

    async def _pump_safely(self) -> None:
        while self._again:
            self._again = False
            try:
                await self.pump()
            except Exception:  # a store hiccup: the deliveries stay due and the next kick sends them
                log.warning("webhook pump failed", exc_info=True)
                return

    async def pump(self) -> int:
        """Claim and send due deliveries until none is left; returns how many were sent."""
        sent = 0
        while True:
            claimed = await asyncio.to_thread(self.store.claim_deliveries, self.owner, self.settings.lease_s,
                                              self.batch)
            if claimed:
                await asyncio.gather(*(self._send(delivery) for delivery in claimed))
            sent += len(claimed)
            if len(claimed) < self.batch:
                return sent

    async def _send(self, delivery: Delivery) -> None:
        error = await self._post(delivery)
        if error is None:
            self.counts["delivered"] += 1
            await asyncio.to_thread(self.store.settle_delivery, delivery.delivery_id, self.owner, True)
            return
        retry_at = self._retry_at(delivery.attempts)
        self.counts["abandoned" if retry_at is None else "failed_attempts"] += 1
        log.warning("webhook delivery %s failed: %s", delivery.delivery_id, error, extra=extra(
            task_id=delivery.task_id, attempt=delivery.attempts, abandoned=retry_at is None))
        await asyncio.to_thread(self.store.settle_delivery, delivery.delivery_id, self.owner, False, retry_at, error)

    def _retry_at(self, attempts: int) -> Optional[float]:
        settings = self.settings
        if attempts >= settings.max_attempts:
            return None
        return self.store.clock() + min(settings.max_backoff_s, settings.backoff_s * 2 ** (attempts - 1))

    async def _post(self, delivery: Delivery) -> Optional[str]:
        """None when the receiver answered 2xx, else why not (a short text for the record and log)."""
        import httpx

        secret = self.secrets.for_key(delivery.key_name)
        if secret is None:
            return "no webhook secret for this key"
        try:
            addresses = await asyncio.to_thread(check_url, delivery.url, self.settings.allow_private, self.resolver)
        except WebhookRefused as refused:
            return str(refused)
        url, host, extensions = pinned(delivery.url, addresses[0])
        body = encode(delivery.payload)
        headers = {"Content-Type": "application/json", "User-Agent": "acestep-serve-webhooks", **host,
                   SIGNATURE_HEADER: sign(secret, body, int(self.wall())),
                   DELIVERY_HEADER: delivery.delivery_id, EVENT_HEADER: delivery.event}
        try:
            async with httpx.AsyncClient(timeout=self.settings.timeout_s, follow_redirects=False,
                                         trust_env=False) as client:
                response = await client.post(url, content=body, headers=headers, extensions=extensions)
        except httpx.HTTPError as error:
            return f"request failed: {type(error).__name__}"
        return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
