"""The YAML config: loading, ``${VAR}`` interpolation, validation, and errors that point home.

Every error names the file, the line and the field, and says what was expected. To get there
the YAML is composed into nodes (which carry their line) and converted by hand, so each value's
path (``destinations.1.settings.api_key``) maps back to its line. Only PyYAML's safe loader is
used; the file size and the number of nodes are capped against alias bombs.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr,
                      ValidationError, field_validator, model_validator)

from router.errors import ConfigError
from router.events import CallType
from router.redaction import Masker, credential_like, redacted_url

if TYPE_CHECKING:
    from router.storage.base import Storage

MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_NODES = 100_000
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
               "h": 3600, "hour": 3600}


def parse_duration(value: Any) -> float:
    """Seconds from ``"10s"``, ``"500ms"``, ``"4h"``, ``"2d"`` or a plain number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), "a duration such as 500ms, 10s, 5m, 12h or 7d")
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError("expected a duration such as 500ms, 10s, 5m, 12h or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _finite(number: float, expected: str) -> float:
    """YAML's ``.inf`` and ``.nan`` are floats: refused here, since no timer or rate can use
    them (an infinite timeout broke every delivery attempt)."""
    if not math.isfinite(number):
        raise ValueError(f"expected {expected}, not {number}")
    return number


def parse_rate(value: Any) -> float:
    """Requests per second from ``"100/s"``, ``"600/m"``, ``"3600/h"`` or a plain number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), "a rate such as 100/s, 600/m or 3600/h")
    match = _RATE.match(str(value))
    if not match:
        raise ValueError("expected a rate such as 100/s, 600/m or 3600/h")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Rate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0)]


def _name(name: str) -> str:
    """A source's or destination's name: it labels metrics and logs and is matched in the
    integrations map, so spaces at its ends (``"hook "`` beside ``hook``) and control
    characters (a newline breaks ``router check``'s table) are refused."""
    if not name.strip():
        raise ValueError("expected a name, not only spaces")
    if name != name.strip():
        raise ValueError("a name may not start or end with spaces")
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        raise ValueError("a name may not contain control characters (newlines, tabs, ...)")
    return name


Name = Annotated[str, Field(min_length=1), AfterValidator(_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(networks: Any) -> Any:
    """Each entry parsed here, once: the egress policy and the proxy check use the networks
    as they are. Anything but a list is left to the list type's own error."""
    if not isinstance(networks, list):
        return networks
    parsed = []
    for index, network in enumerate(networks):
        try:
            if not isinstance(network, str):
                raise ValueError
            parsed.append(ipaddress.ip_network(network, strict=False))
        except ValueError:
            raise ValueError(f"entry {index} is not a network such as 10.1.0.0/16") from None
    return parsed


Networks = Annotated[list[IPNetwork], BeforeValidator(_networks)]
"""CIDRs (``10.1.0.0/16``, ``fd00::/8``, or one address), parsed at load."""


_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _listen_host(host: str) -> str:
    """An IP address or a host name (or ``""``: every interface), checked at load:
    ``999.1.1.1`` passed ``router check`` and failed only when ``router serve`` tried to
    listen."""
    if not host:
        return host
    if re.fullmatch(r"[0-9.]+", host) or ":" in host:
        address = host.removeprefix("[").removesuffix("]")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError("expected an IP address such as 0.0.0.0 or ::, or a host "
                             "name") from None
        return address
    if not _HOST_NAME.fullmatch(host):
        raise ValueError("expected an IP address such as 0.0.0.0 or ::, or a host name")
    return host


class ServerConfig(_Section):
    host: Annotated[str, AfterValidator(_listen_host)] = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_request_bytes: int = Field(500 * 1024, ge=1024)
    max_connections: int = Field(1024, ge=1)
    shutdown_grace: Duration = 30.0
    trusted_proxies: Networks = Field(
        default_factory=list, description="addresses of reverse proxies whose "
        "X-Forwarded-For names the client in the access log")
    log_probes: bool = Field(False, description="write access-log lines for GET /health and "
                             "/metrics answered 200, not only for those that failed")


class DedupConfig(_Section):
    window: Duration = 12 * 3600.0


def secret_as_given(secret: SecretStr) -> SecretStr:
    """A secret as an API or a client sends it: not blank, and no space around it. Taken
    from the environment, a Kubernetes secret that is missing is "" and a value with a
    stray space is easy to make: `router check` said OK, then every event failed at the
    vendor, or every client got 401 (deployment audit)."""
    text = secret.get_secret_value()
    if not text.strip():
        raise ValueError("is empty (an environment variable set to nothing?)")
    if text != text.strip():
        raise ValueError("begins or ends with a space, which no API or client sends (from "
                         "the environment?)")
    return secret


class SourceConfig(_Section):
    name: Name
    write_keys: list[Annotated[SecretStr, AfterValidator(secret_as_given)]] = Field(min_length=1)


class DeliveryOverrides(_Section):
    """Per-destination overrides of the plugin's ``DeliveryDefaults``; unset means default."""

    timeout: Duration | None = None
    max_attempts: int | None = Field(None, ge=1)
    max_age: Duration | None = None
    concurrency: int | None = Field(None, ge=1)
    rate_limit: Rate | None = None
    batch_size: int | None = Field(None, ge=1)
    batch_bytes: int | None = Field(None, ge=1024)
    batch_wait: Annotated[float, BeforeValidator(parse_duration), Field(ge=0)] | None = None
    backoff_initial: Duration | None = None
    backoff_max: Duration | None = None
    retry_on: list[Annotated[int, Field(ge=100, le=599)]] | None = None
    ordered: bool | None = None
    order_hold_attempts: int | None = Field(None, ge=1)


class FilterConfig(_Section):
    """Which events a destination takes, beyond the integrations map."""

    types: list[CallType] | None = None
    events: list[str] | None = Field(None, description="track event names or glob patterns")
    exclude_events: list[str] | None = None


class MappingConfig(_Section):
    """Operator overrides applied before the plugin translates an event."""

    event_names: dict[str, str] = Field(default_factory=dict)
    properties: dict[str, str] = Field(
        default_factory=dict, description="property name -> sandboxed jinja2 template")


class DestinationConfig(_Section):
    name: Name
    plugin: str = Field(min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    default_on: bool = True
    filter: FilterConfig | None = None
    delivery: DeliveryOverrides = Field(default_factory=DeliveryOverrides)
    mapping: MappingConfig = Field(default_factory=MappingConfig)


class EgressConfig(_Section):
    allow_private_addresses: bool = False
    allowed_networks: Networks = Field(default_factory=list,
                                       description="CIDRs allowed even when private")


class DeliveryConfig(_Section):
    own_process: bool = Field(False, description=(
        "deliver from a second process beside the one that accepts events, so the two use "
        "two CPU cores (needs sqlite:// or redis:// storage)"))
    dead_letter_retention: Duration | None = Field(14 * 86400.0, description=(
        "how long a dead letter is kept for `router dlq` before it is deleted (null: kept "
        "until purged by hand)"))


class RouterConfig(_Section):
    """The whole file."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    storage: str = "sqlite:///var/router.db"
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    egress: EgressConfig = Field(default_factory=EgressConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url: str) -> str:
        if not re.match(r"^(sqlite:///.+|memory://.*|redis://.+)$", url):
            raise ValueError("expected sqlite:///relative/path.db, sqlite:////absolute/path.db, "
                             "memory:// or redis://host:port/db")
        # The storage's own options are checked here, where the config's file and line are
        # known (opening it later would fail with a traceback).
        from router.storage import storage_for_url
        storage_for_url(url, base_dir=Path("."))
        return url

    @model_validator(mode="after")
    def _unique_names(self) -> RouterConfig:
        sections: dict[str, Sequence[SourceConfig | DestinationConfig]] = {
            "destinations": self.destinations, "sources": self.sources}
        for kind, items in sections.items():
            seen: dict[str, int] = {}
            for index, item in enumerate(items):
                key = item.name.lower()
                if kind == "destinations" and key == "all":
                    raise ValueError(f"{kind}.{index}.name: 'All' is the integrations map's "
                                     "switch for every destination; choose another name")
                if key in seen:
                    raise ValueError(f"{kind}.{index}.name: {item.name!r} is already used by "
                                     f"{kind}.{seen[key]} (names are case-insensitive)")
                seen[key] = index
        owners: dict[str, int] = {}
        for index, source in enumerate(self.sources):
            for number, write_key in enumerate(source.write_keys):
                owner = owners.setdefault(write_key.get_secret_value(), index)
                if owner != index:  # a request would be credited to the first source only
                    raise ValueError(f"sources.{index}.write_keys.{number}: this write key is "
                                     f"already sources.{owner}'s; each key names one source")
        if self.delivery.own_process and self.storage.startswith("memory://"):
            raise ValueError("delivery.own_process: the delivery process cannot see memory:// "
                             "storage; use sqlite:// or redis://")
        return self


class SourceMap:
    """Where each value of a config came from: file and line by dotted path."""

    def __init__(self, file: str, lines: dict[tuple[Any, ...], int],
                 masker: Masker | None = None) -> None:
        self.file, self.lines = file, lines
        self.masker = masker or Masker()
        """The values the config took from the environment: never quoted in an error, even
        one about a field that holds a secret by mistake (``plugin: ${API_KEY}``)."""

    def error(self, path: Sequence[Any], message: str) -> ConfigError:
        """A ConfigError for the value at ``path``, at its own line or its nearest parent's."""
        path = tuple(path)
        for depth in range(len(path), -1, -1):
            line = self.lines.get(path[:depth])
            if line is not None:
                break
        return ConfigError(self.masker.mask(message), file=self.file, line=line,
                           field=".".join(str(part) for part in path) or None)

    def validation_error(self, exc: ValidationError, prefix: Sequence[Any] = ()) -> ConfigError:
        """The first problem of a pydantic error, without echoing the input (it may be a
        secret); the others are listed after it. The input is read only for its type."""
        errors = exc.errors(include_url=False)
        first, *rest = errors
        error = self.error((*prefix, *first["loc"]), _describe(first))
        if rest:
            more = "; ".join(".".join(str(p) for p in (*prefix, *e["loc"])) + f": {_describe(e)}"
                             for e in rest[:5])
            error = ConfigError(f"{error.message} (also: {more})", file=error.file,
                                line=error.line, field=error.field)
        return error


class LoadedConfig:
    """A validated config and ``source``, the map back to its lines, for error messages."""

    def __init__(self, config: RouterConfig, source: SourceMap,
                 environment_values: frozenset[str] = frozenset()) -> None:
        self.config, self.source = config, source
        self.environment_values = environment_values
        """Every value the config took from an environment variable: secrets come only from
        there, so each destination masks those found in its settings, whatever the field's
        type (a webhook URL with a token in its path, say)."""

    async def open_storage(self, storage: Storage, *, recover: bool = True) -> None:
        """Open the storage the config names; a failure (a directory that cannot be made, a
        Redis that does not answer) is a ``ConfigError`` pointing at the ``storage:`` line."""
        try:
            await storage.open(recover=recover)
        except Exception as exc:  # noqa: BLE001 - whatever the backend raised, say where
            raise self.source.error(("storage",), (
                f"cannot open the storage {redacted_url(self.config.storage)}: "
                f"{type(exc).__name__}: {exc}")) from exc


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, interpolate and validate a config file; ``ConfigError`` on any problem."""
    file = str(path)
    try:
        with open(path, "rb") as config:  # no further than the limit: /dev/zero has no end
            raw = config.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the config: {exc.strerror}", file=file) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the config is over {MAX_CONFIG_BYTES // 1024} KB", file=file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("the config is not UTF-8 text", file=file,
                          line=raw.count(b"\n", 0, exc.start) + 1) from None
    return parse_config(text, file=file, env=os.environ if env is None else env)


def parse_config(text: str, *, file: str = "<config>", env: Mapping[str, str] | None = None
                 ) -> LoadedConfig:
    """Like ``load_config`` for YAML text already in hand (tests, embedding)."""
    lines: dict[tuple[Any, ...], int] = {}
    converter = _Converter(file, lines, os.environ if env is None else env)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = converter.convert(node, ()) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = str(exc.problem or exc)
        raise ConfigError(f"not valid YAML: {problem}{_yaml_hint(problem)}", file=file,
                          line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=file) from None
    except RecursionError:  # thousands of nested brackets: PyYAML's parser recurses
        raise ConfigError("the config nests too deeply to read", file=file) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of sections (server, storage, destinations, ...)",
                          file=file, line=1)
    source = SourceMap(file, lines, Masker(credential_like(converter.environment_values)))
    try:
        config = RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise _model_error(exc, source) or source.validation_error(exc) from None
    return LoadedConfig(config, source, frozenset(converter.environment_values))


_YAML_HINTS = (
    ("'\\t'", "indent with spaces: YAML takes no tabs"),
    ("mapping values are not allowed", "most often a line indented deeper than the key above "
     "it takes, or a value with ': ' in it, which needs quotes"),
    ("expected <block end>", "most often a line indented less or more than the keys beside it"),
    ("could not find expected ':'", "most often a key without its ':', or a line indented as "
     "if it were one"),
    ("but got '{'", "inside { } or [ ], a ${VAR} needs quotes: \"${VAR}\""),
)
"""What PyYAML's commonest complaints most often mean in a config file, said after them."""


def _yaml_hint(problem: str) -> str:
    hint = next((hint for found, hint in _YAML_HINTS if found in problem), None)
    return f" ({hint})" if hint else ""


def _model_error(exc: ValidationError, source: SourceMap) -> ConfigError | None:
    """A whole-config check (``RouterConfig``'s validator) says which field it is about by
    starting its message with the field's path (``sources.1.name: ...``): point there."""
    for error in exc.errors(include_input=False, include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        match = re.match(r"^(\w+(?:\.\w+)+): (.*)$", message)
        if match and not error["loc"]:
            path = [int(part) if part.isdigit() else part for part in match[1].split(".")]
            return source.error(path, match[2])
    return None


_EXPECTED = {
    "extra_forbidden": "unknown field (check its spelling against the docs)",
    "missing": "required field is missing",
    "list_type": "expected a list", "dict_type": "expected a mapping of keys to values",
    "string_type": "expected a string", "bool_type": "expected true or false",
    "bool_parsing": "expected true or false", "int_type": "expected a whole number",
    "int_parsing": "expected a whole number", "int_from_float": "expected a whole number",
    "float_type": "expected a number", "float_parsing": "expected a number",
}
"""pydantic's commonest messages in the words of the other config errors ("Input should be
a valid list"; "Value should have at least 1 item after validation" for an empty key)."""
_BOUNDS = {"greater_than": ("gt", "a number over {}"), "greater_than_equal": ("ge", "{} or more"),
           "less_than": ("lt", "a number under {}"), "less_than_equal": ("le", "{} or less")}


def _describe(error: Mapping[str, Any]) -> str:
    """The problem in the words of the other config errors, never quoting the value."""
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "string_type" and isinstance(error.get("input"), (bool, int, float)):
        # YAML reads an unquoted Off, no, yes or on as a boolean, and 0123 as a number: a
        # destination named Off was "expected a string", which puzzled (docs audit).
        read_as = "true or false" if isinstance(error["input"], bool) else "a number"
        return f"expected a string; YAML read the value as {read_as}: put it in quotes"
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind in _BOUNDS:
        name, wording = _BOUNDS[kind]
        return "expected " + wording.format(context[name])
    if kind == "literal_error":  # a webhook's method: "Input should be 'POST', 'PUT' or ..."
        return f"expected {context['expected']}"
    if kind in ("too_short", "string_too_short"):
        least = context.get("min_length", 1)
        if context.get("field_type") == "List":
            return f"expected at least {least} item{'s' if least > 1 else ''}"
        return "must not be empty" if least == 1 else f"expected at least {least} characters"
    return str(error["msg"]).removeprefix("Value error, ")


class _Converter:
    """Turns composed YAML nodes into plain data, recording lines and expanding ``${VAR}``."""

    def __init__(self, file: str, lines: dict[tuple[Any, ...], int], env: Mapping[str, str]
                 ) -> None:
        self.file, self.lines, self.env, self.nodes = file, lines, env, 0
        self.environment_values: set[str] = set()

    def convert(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        self.nodes += 1
        if self.nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"the config expands to over {MAX_CONFIG_NODES} values "
                              "(too many aliases?)", file=self.file, line=node.start_mark.line + 1)
        self.lines.setdefault(path, node.start_mark.line + 1)
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _COLLECTION_TAGS:
            raise ConfigError(f"unsupported YAML tag {node.tag}", file=self.file,
                              line=node.start_mark.line + 1, field=".".join(map(str, path)))
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            merged: list[dict[Any, Any]] = []
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`
                    merged += self.merge_sources(value_node, path)
                    continue
                key = self.scalar(key_node, path) \
                    if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, (str, int)):
                    raise ConfigError("mapping keys must be strings", file=self.file,
                                      line=key_node.start_mark.line + 1,
                                      field=".".join(map(str, path)) or None)
                if key in result:
                    raise ConfigError(f"duplicate key {key!r}", file=self.file,
                                      line=key_node.start_mark.line + 1,
                                      field=".".join(map(str, path + (key,))))
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                result[key] = self.convert(value_node, path + (key,))
            for source in merged:  # explicit keys win over merged ones, as YAML says
                for key, value in source.items():
                    result.setdefault(key, value)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, path + (index,)) for index, item in enumerate(node.value)]
        value = self.scalar(node, path)
        if isinstance(value, str) and "${" in value:
            value = self.interpolate(value, node, path)
        return value

    def merge_sources(self, node: yaml.Node, path: tuple[Any, ...]) -> list[dict[Any, Any]]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        converted = [self.convert(source, path) for source in sources]
        if not all(isinstance(source, dict) for source in converted):
            raise ConfigError("a merge key (<<) takes a mapping or a list of mappings",
                              file=self.file, line=node.start_mark.line + 1,
                              field=".".join(map(str, path)) or None)
        return converted

    def scalar(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        """A scalar typed by the safe loader (int, float, bool, null, str); any other tag,
        such as ``!!python/object``, is refused."""
        if node.tag == "tag:yaml.org,2002:str":
            return node.value
        try:
            return yaml.SafeLoader("").construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise ConfigError(f"unsupported YAML value: {exc.problem}", file=self.file,
                              line=node.start_mark.line + 1,
                              field=".".join(map(str, path)) or None) from None

    def interpolate(self, text: str, node: yaml.Node, path: tuple[Any, ...]) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    raise ConfigError(f"environment variable {name} is not set "
                                      f"(use ${{{name}:-default}} for a default)",
                                      file=self.file, line=node.start_mark.line + 1,
                                      field=".".join(map(str, path)))
                value = default
            else:
                self.environment_values.add(value)
            if "\n" in value or "\r" in value:
                raise ConfigError(f"environment variable {name} contains a line break",
                                  file=self.file, line=node.start_mark.line + 1,
                                  field=".".join(map(str, path)))
            return value

        leftover = _ENV_REFERENCE.sub("", text)
        if "${" in leftover:  # "${H-x}", "${ H }": used literally, they would hide a typo
            raise ConfigError("a ${...} that is not ${NAME} or ${NAME:-default} (NAME: "
                              "letters, digits and _)", file=self.file,
                              line=node.start_mark.line + 1, field=".".join(map(str, path)))
        return _ENV_REFERENCE.sub(replace, text)

