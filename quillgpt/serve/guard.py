"""Who may talk to the server: the Host a request names, and what its body is.

A web page the user visits can send requests to any address, the user's own machine included:
a cross-origin POST with `Content-Type: text/plain` goes out without asking, and through DNS
rebinding (the page's own host name re-pointed at 127.0.0.1) the page can even read the answers.
`RequestGuard` closes both ways in:

- the `Host` header must be an IP address (a rebinding page sends its own host name, never an
  address), `localhost`, the host name the server listens on, or one of `--allowed-hosts`
  (`*` allows any); anything else gets 400;
- a POST must say `Content-Type: application/json`, which a page can only send after a CORS
  preflight that this server never grants; anything else gets 415.

It is plain ASGI (no buffering), in front of every route, and answers in OpenAI's error shape.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from ..errors import shown


def host_name(header: str) -> str:
    """The host of a `Host` header, without its port, in lower case ("[::1]:80" -> "::1")."""
    host = header.strip().lower()
    if host.startswith("["):  # an IPv6 literal, maybe with a port
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def default_allowed_hosts(bound_host: str | None, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """`localhost`, the name the server listens on (when it is a name), and `extra`."""
    names = ["localhost"]
    if bound_host and not is_ip_address(host_name(bound_host)):
        names.append(host_name(bound_host))
    names += [host_name(h) if h != "*" else h for h in extra]
    return tuple(dict.fromkeys(n for n in names if n))


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    allowed = tuple(allowed)
    if "*" in allowed:
        return True
    if not header:
        return False
    host = host_name(header)
    return is_ip_address(host) or host in allowed


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json"


class RequestGuard:
    """ASGI middleware: refuse a request with a foreign Host (400) or a POST that is not JSON (415)."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                from starlette.responses import JSONResponse

                status, message, param = problem
                body = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                  "code": None}}
                await JSONResponse(body, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, scope: dict) -> tuple[int, str, str | None] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not host_allowed(host, self.allowed_hosts):
            return (400, f"Host {shown(host_name(host or ''))} is not served here (this server answers to "
                         f"{', '.join(self.allowed_hosts)} and IP addresses); start it with --allowed-hosts "
                         f"to add a name", None)
        if scope.get("method") == "POST" and not is_json(headers.get("content-type")):
            return (415, f"Content-Type must be application/json, got {shown(headers.get('content-type'))}",
                    None)
        return None
