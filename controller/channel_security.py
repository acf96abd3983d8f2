"""What keeps the channel's token the job's own: strong tokens, TLS off the host, loud open binds.

The controller refuses a token a person typed or left in place (the Kubernetes Secret's
placeholder, `aaaaaaaaaaaaaaaa`), says loudly when a port listens beyond loopback, and serves
the channel over TLS when given a certificate and key (--tls-cert, --tls-key); the agent
verifies it with TRAINWARDEN_CA_FILE (adapters/channel.py).
"""

from __future__ import annotations

import ipaddress
import math
import os
import ssl
import urllib.request
from collections import Counter
from typing import Any

#: Shortest token taken, and the least entropy its characters show (bits, by their frequencies):
#: `secrets.token_urlsafe(32)` shows about 200, 32 random hex digits about 110.
MIN_TOKEN_CHARS = 16
MIN_TOKEN_BITS = 64.0
#: Words that mark a token as a placeholder someone meant to replace.
PLACEHOLDER_WORDS = (
    "replace",
    "changeme",
    "change-me",
    "example",
    "placeholder",
    "your-token",
    "yourtoken",
    "todo",
)
HOW_TO_MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_problem(token: str) -> str | None:
    """Why `token` is not a token to guard a training job with (None: it is)."""
    fix = f"make a random one, e.g. `{HOW_TO_MAKE_ONE}` (or `openssl rand -hex 32`)"
    if len(token) < MIN_TOKEN_CHARS:
        return f"the token is too short ({len(token)} characters): use at least {MIN_TOKEN_CHARS}; {fix}"
    lowered = token.lower()
    word = next((w for w in PLACEHOLDER_WORDS if w in lowered), None)
    if word is not None:
        return f"the token looks like a placeholder (it contains {word!r}), not a secret; {fix}"
    bits = entropy_bits(token)
    if bits < MIN_TOKEN_BITS:
        return (
            f"the token is too easy to guess (its characters carry about {bits:.0f} bits, less than "
            f"{MIN_TOKEN_BITS:.0f}: repeated or too few distinct characters); {fix}"
        )
    return None


def entropy_bits(token: str) -> float:
    """Length times the Shannon entropy of the token's character frequencies: 0 for `aaaa...`."""
    counts = Counter(token)
    n = len(token)
    per_char = max(0.0, -sum(c / n * math.log2(c / n) for c in counts.values()))
    return n * per_char


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for the channel (TLS 1.2 or later). Raises OSError/ssl.SSLError on bad files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


#: `1`: the channel may go through the proxy the environment names (http_proxy, https_proxy).
ENV_USE_PROXY = "TRAINWARDEN_USE_PROXY"
#: A PEM file of the CA (or the self-signed certificate) that signed the controller's certificate.
ENV_CA_FILE = "TRAINWARDEN_CA_FILE"


def channel_opener(endpoint: str, environ: Any = None) -> urllib.request.OpenerDirector:
    """The urllib opener for the channel (and anything else that carries the token): no proxy
    unless TRAINWARDEN_USE_PROXY=1, TLS verified against TRAINWARDEN_CA_FILE when given."""
    env = os.environ if environ is None else environ
    handlers: list[Any] = []
    if env.get(ENV_USE_PROXY, "") != "1":
        handlers.append(urllib.request.ProxyHandler({}))  # an empty map: no proxy at all
    if endpoint.startswith("https:"):
        ca_file = env.get(ENV_CA_FILE) or None
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"{ENV_CA_FILE}={ca_file} cannot be read as PEM certificates ({exc}); point it at the "
                "certificate the controller was given with --tls-cert (or its CA)"
            ) from exc
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)
