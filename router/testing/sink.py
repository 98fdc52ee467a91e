"""``python -m router.testing.sink --port 9900``: a local destination that prints what it gets.

``make serve`` starts it beside the router so the default config works offline and shows, for
each request a destination sends, its method, path and body. It answers 200 to everything and
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import orjson
from aiohttp import web

from router.redaction import REDACTED, SENSITIVE_HEADERS, Masker


_CREDENTIAL_NAME = re.compile(
    r"(?:^|[_$-])(?i:key|token|secret|password|passwd|pwd)$"  # api_key, $token, pwd
    r"|[a-z0-9](?:Key|Token|Secret|Password|KEY|TOKEN|SECRET|PASSWORD)$")  # writeKey
"""Body fields whose names say they hold a credential (Amplitude's ``api_key``, Mixpanel's
``$token``): the sink does not know the secrets, and a real key pointed at it by mistake
would be printed."""


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {name: REDACTED if isinstance(item, str) and _CREDENTIAL_NAME.search(name)
                else _masked(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        shown = orjson.dumps(_masked(orjson.loads(body)), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        shown = body.decode("utf-8", errors="replace")
    headers = ", ".join(f"{name}: {REDACTED if name.lower() in SENSITIVE_HEADERS else value}"
                        for name, value in request.headers.items()
                        if name.lower() not in ("host", "content-length", "accept-encoding",
                                                "accept", "user-agent"))
    path = Masker().mask_url(request.path_qs)  # api_secret=, token=, ... never printed
    print(f"--> {request.method} {path}  ({headers})\n{shown}\n", flush=True)
    return web.json_response({})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.testing.sink", description=__doc__)
    parser.add_argument("--port", type=int, default=9900)
    args = parser.parse_args(argv)
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", receive)
    print(f"sink: printing what destinations send to http://127.0.0.1:{args.port}/", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
