"""The cashier app: the page the node serves at ``/`` on the terminal API's TCP listener, for
the terminal's own screen (a kiosk browser on the device), and its PIN login.

The page is three static files shipped in the package (``cashier_static/``, package data):
nothing comes from elsewhere, and a strict Content-Security-Policy says so to the browser. The
page calls the ``/v1`` API itself with the session cookie set by ``POST /cashier/login``; the
bearer token never reaches it (meshpos.terminal.guard, meshpos.terminal.cashier).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from meshpos.domain.errors import InputError, MeshposError
from meshpos.terminal.app import TooLarge, read_body, respond
from meshpos.terminal.cashier import CashierLogin, CookiePolicy, Locked, LoginRefused, cookie_value
from meshpos.terminal.problems import error_body, translate

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/cashier/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/cashier/app.css": ("app.css", "text/css; charset=utf-8")}
LOGIN, LOGOUT, SESSION = "/cashier/login", "/cashier/logout", "/cashier/session"
PUBLIC = frozenset({*FILES, LOGIN, LOGOUT, SESSION})  # served without a token or a session


def static_file(name: str) -> bytes:
    return (resources.files("meshpos.terminal") / "cashier_static" / name).read_bytes()


@dataclass(frozen=True)
class CashierSetup:
    """What the page needs to know of its node before the first sale (GET /cashier/session)."""

    name: str  # the terminal's name
    language: str  # the node's configured language: the page's default
    currency: str
    decimals: int  # the currency's minor units (2 for EUR)
    keyed: bool  # keyed card entry: the policy has a switch key to seal cards to
    reader: bool  # a card reader is configured


class CashierPage:
    def __init__(self, login: CashierLogin, cookies: CookiePolicy, setup: Callable[[], CashierSetup]) -> None:
        self.login = login
        self.cookies = cookies
        self.setup = setup
        self.files = {path: (static_file(name), kind) for path, (name, kind) in FILES.items()}

    def session_ok(self, cookie_header: str | None) -> bool:
        return self.login.sessions.valid(cookie_value(cookie_header))

    def routes(self) -> list[BaseRoute]:
        async def page(request: Request) -> Response:
            body, kind = self.files[request.url.path]
            return Response(body, media_type=kind, headers=HEADERS)

        async def session(request: Request) -> Response:
            setup = self.setup()
            try:
                pin_set = self.login.pin_set()
            except MeshposError:
                pin_set = False
            return _json(200, {"logged_in": self.session_ok(request.headers.get("cookie")), "pin_set": pin_set,
                               "name": setup.name, "language": setup.language, "currency": setup.currency,
                               "decimals": setup.decimals,
                               "keyed": setup.keyed, "reader": setup.reader})

        async def login(request: Request) -> Response:
            try:
                body = await read_body(request, required=True)
                if not isinstance(body, dict) or set(body) != {"pin"} or not isinstance(body["pin"], str):
                    raise InputError("the body must be {\"pin\": \"...\"}")
                token = await self.login.login(body["pin"], local=_loopback(request))
            except TooLarge:
                return _json(413, error_body("too_large", "the body is too large"))
            except Locked as exc:
                return _json(429, error_body("locked", str(exc)), {"Retry-After": str(exc.retry_after_s)})
            except LoginRefused as exc:
                return _json(401, error_body("wrong_pin", str(exc)))
            except MeshposError as exc:
                status, problem = translate(exc)
                return _json(status, problem)
            return _json(200, {"logged_in": True}, {"Set-Cookie": self.cookies.set(token)})

        async def logout(request: Request) -> Response:
            self.login.sessions.close(cookie_value(request.headers.get("cookie")))
            return _json(200, {"logged_in": False}, {"Set-Cookie": self.cookies.clear()})

        return [*(Route(path, page, methods=["GET"]) for path in FILES),
                Route(SESSION, session, methods=["GET"]), Route(LOGIN, login, methods=["POST"]),
                Route(LOGOUT, logout, methods=["POST"])]


def _loopback(request: Request) -> bool:
    """The client is on this device (the kiosk screen): its wrong PINs count apart from the network's."""
    try:
        return request.client is not None and ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's JSON answer (meshpos.terminal.app.respond) with the page's security headers."""
    return respond(status, value, {**HEADERS, **(headers or {})})

