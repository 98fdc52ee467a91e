"""Masking secrets wherever something is shown: dry-run, logs, dead letters, errors.

Secrets are known by type (every ``SecretStr`` in a destination's settings),
so masking replaces their values wherever they occur, including inside URLs (GA4 and Meta take
keys in the query string) and bodies; credential headers are masked whole, since a Basic or
Bearer header encodes its secret. A secret is masked in each form it takes on the way out
and back: as JSON escapes it, as a URL encodes it, and, for a secret URL (a Slack webhook,
a webhook URL from the environment), each part of it that is a credential alone (its
password and the Basic header built from it, a token in its path or query), since an API
that answers an error by echoing the request shows the parts, never the whole URL.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import orjson
from pydantic import BaseModel, SecretStr

REDACTED = "**REDACTED**"
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key",
                               "x-auth-token", "cookie"})
_MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text ("1", "abc")
_CREDENTIAL_QUERY = re.compile(
    r"([?&](?:[^=&#]*(?:token|key|secret|signature|sig|auth|password|passwd|pwd|jwt)[^=&#]*"
    r"|code)=)([^&#]*)",  # code: Azure Functions' key parameter
    re.IGNORECASE)
_LOWER_HEX = re.compile(r"%[0-9A-F]{2}")
_MIN_TOKEN_LENGTH = 8  # a word of a secret long enough to be a credential on its own


def secret_values(value: Any) -> Iterator[str]:
    """Every SecretStr value inside a settings model, dict or list, at any depth."""
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        yield secret
        # "Bearer <token>": an API that echoes the token alone must not reveal it either.
        yield from (part for part in secret.split() if len(part) >= _MIN_TOKEN_LENGTH)
    elif isinstance(value, BaseModel):
        for field_name in type(value).model_fields:
            yield from secret_values(getattr(value, field_name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from secret_values(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from secret_values(item)


def values_found_in(data: Any, values: Iterable[str]) -> list[str]:
    """Those of ``values`` that occur in a string anywhere in plain ``data`` (a destination's
    settings as the config gave them): what the config took from the environment and put
    there, to be masked whatever the setting's type (a token in a webhook URL's path).

    Values that cannot be credentials are left out: masking ``true``, ``POST`` or ``EU``
    everywhere would garble bodies and logs (a masked ``true`` is not JSON any more).
    Settings declared secret are masked from 4 characters on (see ``Masker``)."""
    strings = list(_strings(data))
    return [value for value in credential_like(values)
            if any(value in string for string in strings)]


def passwords_of_urls_in(data: Any) -> list[str]:
    """The password parts (``url_credentials``) of each URL in plain ``data`` that holds a
    password: ``http://svc:${PASSWORD}@host/`` makes the HTTP client send a ``Basic``
    header built from the user and the password, which an API that echoes the request
    shows, though neither the whole URL nor the password appears in it. Its path and query
    are left alone: only a URL that is a secret whole has its tokens masked (a literal path
    beside an environment host is config, not a secret)."""
    return [part for text in _strings(data) if "://" in text
            for part in url_credentials(text, tokens=False)]


def credential_like(values: Iterable[str]) -> list[str]:
    """Those of ``values`` that may be credentials (see ``values_found_in``)."""
    return [value for value in values if _may_be_a_credential(value)]


def _may_be_a_credential(value: str) -> bool:
    if len(value) < _MIN_TOKEN_LENGTH:
        return False
    try:
        return not isinstance(orjson.loads(value), (int, float, bool))
    except orjson.JSONDecodeError:
        return True


def _strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for item in data.values():
            yield from _strings(item)
    elif isinstance(data, list):
        for item in data:
            yield from _strings(item)


def redacted_url(url: str) -> str:
    """A URL safe to show: its password (``redis://user:secret@host``) replaced, and the
    values of query parameters whose names say they are credentials (redis-py also takes
    ``?password=``). The user information ends at the *last* ``@`` before the host, so a
    password with an unescaped ``@`` or ``/`` (which cuts a parser's netloc short) is still
    hidden whole."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if separator and at and ":" in userinfo:
        url = f"{scheme}://{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    return _masked_credential_query(url)


_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)", re.DOTALL)
_AUTHORITY = re.compile(r"""[^/?#\\\s'"]*""")


def cut_at_first_url(text: str) -> str:
    """``text`` cut at its first URL, which is kept as its scheme and host: for messages
    that quote a URL (aiohttp's errors, a redirect's ``Location``), whose user information,
    path or query may hold a key. Everything after the URL goes too, since where an
    unencoded URL ends (a space, a quote in its query) cannot be told for sure; aiohttp's
    messages end with the URL. When an ``@`` follows the host's place (a password with an
    unencoded ``/``, an address in the query), where the host is cannot be told either, and
    only the scheme is kept."""
    return _URL.sub(_scheme_and_host, text, count=1)


def _scheme_and_host(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)
    authority = _AUTHORITY.match(rest)
    assert authority is not None  # the pattern matches the empty string too
    if "@" in rest[authority.end():]:
        return f"{scheme}://…"
    return f"{scheme}://{authority.group(0).rpartition('@')[2]}/…"


def _masked_credential_query(url: str) -> str:
    return _CREDENTIAL_QUERY.sub(lambda m: m.group(1) + REDACTED, url)


def url_credentials(text: str, *, tokens: bool = True) -> list[str]:
    """The parts of a URL that are credentials on their own: the password of its user
    information (8 characters or more: ``admin`` would mask the word everywhere) and the
    ``Basic`` value an HTTP client builds from it, and with ``tokens`` the path segments and
    query values that look like tokens (``/services/T0/B0/<token>``, ``?key=<token>``).
    Nothing for text that is not an http(s) URL."""
    try:
        parts = urlsplit(text.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            return []
        found = []
        if parts.password:
            user, password = unquote(parts.username or ""), unquote(parts.password)
            found.append(base64.b64encode(f"{user}:{password}".encode()).decode())
            if len(password) >= _MIN_TOKEN_LENGTH:
                found += [parts.password, password]
        if tokens:
            found += [segment for segment in parts.path.split("/")
                      if _looks_like_a_token(segment)]
            found += [value for _, value in parse_qsl(parts.query)
                      if _looks_like_a_token(value)]
        return found
    except ValueError:  # a port that is not a number, brackets that do not close
        return []


def _looks_like_a_token(text: str) -> bool:
    """Not a word, a date or a version: 16 characters and more, or 8 and more with letters
    and digits both (``services``, ``webhooks`` and ``2024-06-01`` stay readable)."""
    return len(text) >= 16 or (
        len(text) >= _MIN_TOKEN_LENGTH and any(character.isdigit() for character in text)
        and any(character.isalpha() for character in text))


def _forms(secret: str) -> Iterator[str]:
    """``secret`` as it may appear in text: as it is, inside a JSON string, percent-encoded
    in a URL's path or query, and, for a URL, each of its credential parts."""
    # inside a JSON string as orjson writes it, and as other JSON writers escape it:
    # Python's json (non-ASCII as \\u00e9), PHP's (/ as \\/), Go's (<, > and & as \\u003c,
    # \\u003e, \\u0026)
    as_json, as_ascii_json = orjson.dumps(secret).decode()[1:-1], json.dumps(secret)[1:-1]
    encoded = quote(secret, safe="")
    yield secret
    yield as_json
    yield as_ascii_json
    yield as_ascii_json.replace("/", "\\/")
    yield as_json.replace("/", "\\/")
    yield as_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    yield encoded
    yield _LOWER_HEX.sub(lambda match: match.group(0).lower(), encoded)
    yield quote(secret, safe="/:@!$&'()*+,;=~")  # a path, as yarl (aiohttp) encodes it
    yield quote_plus(secret)
    for part in url_credentials(secret):
        yield from (part, quote(part, safe=""), orjson.dumps(part).decode()[1:-1])


def _masked_in_any_case(pattern: re.Pattern[str], text: str) -> str:
    """``text`` with what ``pattern`` (of lower-case forms) finds in its lower-cased copy
    masked. Where lower-casing changes the length (``İ``), the places would not line up, and
    the pattern ignoring case does the work instead."""
    lowered = text.lower()
    if len(lowered) != len(text):
        return re.compile(pattern.pattern, re.IGNORECASE).sub(REDACTED, text)
    pieces: list[str] = []
    end = 0
    for found in pattern.finditer(lowered):
        pieces += (text[end:found.start()], REDACTED)
        end = found.end()
    return "".join(pieces) + text[end:] if pieces else text


class Masker:
    """Replaces known secret values, in every form they take (``_forms``), in text with
    ``**REDACTED**``. Forms long enough to be credentials on their own are found in any
    case: an API that echoes a key in its error may have lower-cased it first."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.given = tuple(secrets)
        """The secrets as they were given, before their other forms are added."""
        self.secrets = sorted({form for secret in self.given if secret
                               for form in _forms(secret) if len(form) >= _MIN_SECRET_LENGTH},
                              key=len, reverse=True)
        # The long forms are looked for in the lower-cased text (a pattern that ignores case
        # made masking 7 times slower); the short ones as they are, after them.
        long = sorted({form.lower() for form in self.secrets if len(form) >= _MIN_TOKEN_LENGTH},
                      key=len, reverse=True)
        short = [form for form in self.secrets if len(form) < _MIN_TOKEN_LENGTH]
        self._long = re.compile("|".join(map(re.escape, long))) if long else None
        self._short = re.compile("|".join(map(re.escape, short))) if short else None
        self._with_credentials: tuple[tuple[str, ...], Masker] | None = None

    @classmethod
    def joined(cls, maskers: Iterable[Masker]) -> Masker:
        """One masker hiding what each of ``maskers`` hides: several destinations' secrets,
        where a stored payload may carry any of them. One, not a sum: each sum builds (and
        compiles) another."""
        return cls([secret for masker in maskers for secret in masker.given])

    def mask(self, text: str) -> str:
        if self._long is not None:
            text = _masked_in_any_case(self._long, text)
        return self._short.sub(REDACTED, text) if self._short is not None else text

    def mask_url(self, url: str) -> str:
        """A URL safe to show: known secrets masked, and the values of query parameters
        whose names say they are credentials (``?token=``, ``&api_key=``, ...)."""
        return _masked_credential_query(self.mask(url))

    def mask_json(self, data: bytes) -> Any:
        """A JSON body as the value it encodes, every string in it masked (or, when it is not
        JSON, its text masked). Masked once decoded: a secret with a quote in it is escaped
        in the JSON text, where it would not be found."""
        try:
            return self._masked(orjson.loads(data))
        except orjson.JSONDecodeError:
            return self.mask(data.decode("utf-8", errors="replace"))

    def _masked(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {self.mask(key): self._masked(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._masked(item) for item in value]
        return value

    def with_credentials_of(self, headers: Mapping[str, str], url: str = "") -> Masker:
        """This masker, also hiding the credentials of a request it sent: its credential
        header values, whole and without their scheme, and the values of the URL's query
        parameters named as credentials (``?api_key=``). They may be derived from the
        secrets (``Basic`` is base64 of "key:") or written in the config as they are, so an
        API that echoes the request in its error would show them unmasked."""
        found = tuple(part for name, value in headers.items()
                      if name.lower() in SENSITIVE_HEADERS for part in (value, *value.split()[1:]))
        found += tuple(value for match in _CREDENTIAL_QUERY.finditer(url)
                       for value in {match[2], unquote(match[2])} if value)
        if not found:
            return self
        # Built once for a destination's (usually unchanging) credentials, not once a
        # failed request: a destination refusing everything fails every request.
        if self._with_credentials is None or self._with_credentials[0] != found:
            self._with_credentials = (found, Masker([*self.given, *found]))
        return self._with_credentials[1]

    def mask_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {name: REDACTED if name.lower() in SENSITIVE_HEADERS else self.mask(value)
                for name, value in headers.items()}
