"""The YAML config (contract, "Config"): loading, ${VAR}, and errors that name file, line, field.

Lines marked ``#!`` in the YAML below are where the error must point.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from router.config import load_config, parse_config
from router.destination import DeliveryDefaults
from router.errors import ConfigError
from router.registry import create_registry
from router.routing import Router

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "router.yaml"
SECRET = "sk_live_CANARY_b7e21d90"


@pytest.fixture(autouse=True)
def _quiet_plugin_warnings():
    # Built-in plugins still being written log a warning when they fail to load.
    logging.getLogger("router.plugins").setLevel(logging.ERROR)
    yield
    logging.getLogger("router.plugins").setLevel(logging.NOTSET)


def write(tmp_path: Path, text: str, name: str = "router.yaml") -> tuple[Path, int | None]:
    """Write the config; return its path and the 1-based line marked ``#!`` (if any)."""
    text = textwrap.dedent(text).lstrip("\n")
    path = tmp_path / name
    path.write_text(text)
    marked = [number for number, line in enumerate(text.splitlines(), 1) if "#!" in line]
    return path, marked[0] if marked else None


def router_for(path: Path, env: dict | None = None):
    """The embedding path that also checks plugin settings and templates."""
    from router.routing import Router
    return Router(load_config(path, env=env), deliver=False)


def assert_points_at(error: ConfigError, path: Path, line: int, field: str) -> None:
    text = str(error)
    assert error.file == str(path)
    assert error.line == line, text
    assert error.field == field, text
    assert text.startswith(f"{path}:{line}: "), text
    assert field in text


def config_error(path: Path, *, env: dict | None = None, build: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        if build:
            router_for(path, env=env)
        else:
            load_config(path, env={} if env is None else env)
    return caught.value


# -- the example and interpolation --------------------------------------------------------------

def test_example_config_loads_with_its_defaults():
    loaded = load_config(EXAMPLE, env={})
    config = loaded.config
    assert config.storage == "sqlite:///var/router.db"
    assert config.dedup.window == 12 * 3600
    assert config.server.port == 8080
    assert [s.name for s in config.sources] == ["website"]
    assert config.sources[0].write_keys[0].get_secret_value() == "demo-write-key"
    assert [d.name for d in config.destinations] == [
        "webhook", "Amplitude", "Mixpanel", "Google Analytics 4", "Meta", "Slack", "Order alerts"]
    assert config.destinations[0].settings["url"] == "http://127.0.0.1:9900/webhook"
    assert config.destinations[0].settings["headers"]["Authorization"] == "Bearer demo-token"
    assert config.destinations[-1].filter.events == ["Order *"]


@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:6390/0?ssl=true", "TLS to Redis"),
    ("redis://127.0.0.1:6390/0?eviction=yes", "takes only `allowed`"),
    ("redis://127.0.0.1:6390/0?socket_timeout=soon", "invalid redis:// storage URL"),
    ("redis://127.0.0.1:6390/0?prefx=staging", "unknown redis:// storage option 'prefx'"),
    ("redis://127.0.0.1:6390/0?retry=3", "unknown redis:// storage option 'retry'"),  # an object
    ("sqlite:///var/r.db?max_bytes=lots", "whole number of bytes"),
    ("sqlite:///var/r.db?min_free_bytes=-1", "whole number of bytes"),
    ("sqlite:///var/r.db?synchronous=sometimes", "`normal` (the default) or `full`"),
    ("sqlite:///var/r.db?max_byte=10", "unknown sqlite:// storage option 'max_byte'"),
])
def test_a_storage_option_that_is_wrong_fails_at_load_with_file_and_line(tmp_path, url, says):
    path, line = write(tmp_path, f"""
        destinations: []
        storage: "{url}"   #!
    """)
    error = config_error(path)
    assert_points_at(error, path, line, "storage")
    assert says in str(error)
    assert not (tmp_path / "var").exists()


def test_redis_options_that_redis_py_takes_load(tmp_path):
    """Named in docs/storage.md: the router passes them on to redis-py."""
    path, _ = write(tmp_path, """
        destinations: []
        storage: "redis://127.0.0.1:6390/0?prefix=a&socket_timeout=3&client_name=router-a&health_check_interval=5"
    """)
    assert load_config(path, env={}).config.storage.endswith("health_check_interval=5")


def test_example_config_builds_its_destinations(monkeypatch, tmp_path):
    for name in ("WEBHOOK_URL", "WEBHOOK_TOKEN", "ROUTER_WRITE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # its sqlite:///var/router.db is relative to the cwd
    router = router_for(EXAMPLE)
    assert [d.name for d in router.destinations] == [
        "webhook", "Amplitude", "Mixpanel", "Google Analytics 4", "Meta", "Slack", "Order alerts"]
    assert {d.plugin.name for d in router.destinations} == {
        "webhook", "amplitude", "mixpanel", "ga4", "meta_capi", "slack"}
    assert not (tmp_path / "var" / "router.db").exists(), "building a router opens no storage"


def test_env_variables_and_defaults_are_interpolated(tmp_path):
    path, _ = write(tmp_path, """
        storage: ${STORAGE:-memory://}
        server:
          port: ${PORT}
        sources:
          - name: web
            write_keys: ["${KEY_A}", "static-${KEY_B:-fallback}-end"]
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: https://${HOST}/v1/${PATH_PART:-events}
              headers:
                Authorization: "Bearer ${TOKEN}"
    """)
    config = load_config(path, env={"PORT": "9000", "KEY_A": "ka", "HOST": "hooks.example",
                                     "TOKEN": "t0k", "PATH_PART": ""}).config
    assert config.storage == "memory://"
    assert config.server.port == 9000
    assert [k.get_secret_value() for k in config.sources[0].write_keys] == \
        ["ka", "static-fallback-end"]
    settings = config.destinations[0].settings
    assert settings["url"] == "https://hooks.example/v1/events"  # empty value takes the default
    assert settings["headers"]["Authorization"] == "Bearer t0k"
    # what came from the environment, to be masked wherever it shows; defaults did not
    assert load_config(path, env={"PORT": "9000", "KEY_A": "ka", "HOST": "hooks.example",
                                  "TOKEN": "t0k", "PATH_PART": ""}).environment_values == {
        "9000", "ka", "hooks.example", "t0k"}


def test_env_value_wins_over_default(tmp_path):
    path, _ = write(tmp_path, "storage: ${STORAGE:-memory://}\n")
    assert load_config(path, env={"STORAGE": "sqlite:///x.db"}).config.storage == "sqlite:///x.db"


def test_env_is_read_from_the_process_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTER_TEST_STORAGE", "memory://from-env")
    path, _ = write(tmp_path, "storage: ${ROUTER_TEST_STORAGE}\n")
    assert load_config(path).config.storage == "memory://from-env"


def test_missing_env_variable_names_file_line_field_and_variable(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: https://${HOOK_HOST}/in   #!
    """)
    error = config_error(path)
    assert_points_at(error, path, line, "destinations.0.settings.url")
    assert "HOOK_HOST" in str(error)


def test_env_value_with_a_line_break_is_refused(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        sources:
          - name: web
            write_keys:
              - ${WRITE_KEY}   #!
    """)
    error = config_error(path, env={"WRITE_KEY": f"{SECRET}\nX-Injected: 1"})
    assert_points_at(error, path, line, "sources.0.write_keys.0")
    assert "WRITE_KEY" in str(error)
    assert SECRET not in str(error)


# -- errors point home ------------------------------------------------------------------------

ERROR_CASES = {
    "unknown top-level field": ("""
        storage: memory://
        sever:          #!
          port: 8080
    """, "sever"),
    "unknown nested field": ("""
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: https://hooks.example
            delivery:
              timeout: 5s
              timout: 5s   #!
    """, "destinations.0.delivery.timout"),
    "wrong type": ("""
        storage: memory://
        server:
          host: 0.0.0.0
          port: [8080]   #!
    """, "server.port"),
    "port out of range": ("""
        storage: memory://
        server:
          port: 70000   #!
    """, "server.port"),
    "bad dedup window": ("""
        storage: memory://
        dedup:
          window: 12 hours   #!
    """, "dedup.window"),
    "bad timeout": ("""
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings: {url: "https://hooks.example"}
            delivery:
              timeout: soon   #!
    """, "destinations.0.delivery.timeout"),
    "negative duration": ("""
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings: {url: "https://hooks.example"}
            delivery:
              max_age: -4h   #!
    """, "destinations.0.delivery.max_age"),
    "bad rate": ("""
        storage: memory://
        destinations:
          - name: a
            plugin: webhook
            settings: {url: "https://a.example"}
          - name: b
            plugin: webhook
            settings: {url: "https://b.example"}
            delivery:
              rate_limit: fast   #!
    """, "destinations.1.delivery.rate_limit"),
    "bad retry status": ("""
        storage: memory://
        destinations:
          - name: a
            plugin: webhook
            settings: {url: "https://a.example"}
            delivery:
              retry_on: [429, 99]   #!
    """, "destinations.0.delivery.retry_on.1"),
    "bad storage url": ("""
        server:
          port: 8080
        storage: postgres://db.example/router   #!
    """, "storage"),
    "duplicate destination names": ("""
        storage: memory://
        destinations:
          - name: Slack alerts
            plugin: webhook
            settings: {url: "https://a.example"}
          - name: slack ALERTS   #!
            plugin: webhook
            settings: {url: "https://b.example"}
    """, "destinations.1.name"),
    "a destination named like the integrations map's All": ("""
        storage: memory://
        destinations:
          - name: all   #!
            plugin: webhook
            settings: {url: "https://a.example"}
    """, "destinations.0.name"),
    "a ${...} that is not a variable reference": ("""
        storage: memory://
        destinations:
          - name: a
            plugin: webhook
            settings:
              url: "https://a.example/${HOOK-default}"   #!
    """, "destinations.0.settings.url"),
    "a destination name ending in a space": ("""
        storage: memory://
        destinations:
          - name: "hook "   #!
            plugin: webhook
            settings: {url: "https://a.example"}
    """, "destinations.0.name"),
    "a source name with a line break": ("""
        storage: memory://
        sources:
          - name: "web\\nsite"   #!
            write_keys: [k]
    """, "sources.0.name"),
    "an empty write key": ("""
        storage: memory://
        sources:
          - name: web
            write_keys: ["", k]   #!
    """, "sources.0.write_keys.0"),
    "own_process with memory storage": ("""
        storage: memory://
        delivery:
          own_process: true   #!
    """, "delivery.own_process"),
    "a value of an unknown type": ("""
        storage: memory://
        dedup:
          window: !!binary aGk=   #!
    """, "dedup.window"),
    "a key that is not a string": ("""
        storage: memory://
        server:
          [a, b]: 1   #!
    """, "server"),
    "duplicate source names": ("""
        storage: memory://
        sources:
          - name: web
            write_keys: [a]
          - name: WEB   #!
            write_keys: [b]
    """, "sources.1.name"),
    "a write key in two sources": ("""
        storage: memory://
        sources:
          - name: web
            write_keys: [key-a, key-b]
          - name: ios
            write_keys:
              - key-c
              - key-b   #!
    """, "sources.1.write_keys.1"),
    "unknown call type in filter": ("""
        storage: memory://
        destinations:
          - name: a
            plugin: webhook
            settings: {url: "https://a.example"}
            filter:
              types:
                - track
                - purchase   #!
    """, "destinations.0.filter.types.1"),
    "missing required field": ("""
        storage: memory://
        destinations:
          - name: a   #!
            settings: {url: "https://a.example"}
    """, "destinations.0.plugin"),
    "empty write keys": ("""
        storage: memory://
        sources:
          - name: web
            write_keys: []   #!
    """, "sources.0.write_keys"),
    "duplicate yaml key": ("""
        storage: memory://
        server:
          port: 1
          port: 2   #!
    """, "server.port"),
}


@pytest.mark.parametrize("text, field", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_config_error_names_file_line_and_field(tmp_path, text, field):
    path, line = write(tmp_path, text)  # a missing key has no line: it points at its entry
    assert_points_at(config_error(path), path, line, field)


def test_error_says_what_was_expected(tmp_path):
    path, _ = write(tmp_path, """
        storage: memory://
        dedup:
          window: forever
    """)
    assert "12h" in str(config_error(path))  # an example of a valid duration
    path, _ = write(tmp_path, "storage: mysql://x\n")
    assert "sqlite:///" in str(config_error(path))


@pytest.mark.parametrize("text, says", [
    # pydantic's own words were "Value should have at least 1 item after validation, not 0"
    # for an empty key, "Input should be a valid list" (contract audit)
    ('sources: [{name: web, write_keys: [""]}]', "sources.0.write_keys.0: is empty"),
    ("sources: [{name: web, write_keys: key}]", "sources.0.write_keys: expected a list"),
    ("sources: [{name: web, write_keys: []}]", "write_keys: expected at least 1 item"),
    ("server: {port: 99999}", "server.port: expected 65535 or less"),
    ("server: {port: http}", "server.port: expected a whole number"),
    ("server: {max_connections: 0}", "server.max_connections: expected 1 or more"),
    ("server: {max_request_bytes: 1023}", "server.max_request_bytes: expected 1024 or more"),
    ("egress: {allow_private_addresses: maybe}", "expected true or false"),
    ("destinations: [{name: d, plugin: webhook, settings: {url: https://a.example, "
     "headers: [1]}}]", "settings.headers: expected a mapping of keys to values"),
    ("destinations: [{name: d, plugin: webhook, settings: {url: https://a.example}, "
     "delivery: {backoff_initial: 0}}]", "delivery.backoff_initial: expected a number over 0"),
    ("destinations: [{name: d, plugin: webhook, settings: {url: https://a.example, "
     "method: GET}}]", "settings.method: expected 'POST', 'PUT' or 'PATCH'"),
    # YAML 1.1 reads an unquoted Off as false: "expected a string" alone puzzled (docs audit)
    ("destinations: [{name: Off, plugin: webhook, settings: {url: https://a.example}}]",
     "destinations.0.name: expected a string; YAML read the value as true or false: put it "
     "in quotes"),
    ("sources: [{name: 2024, write_keys: [k]}]",
     "sources.0.name: expected a string; YAML read the value as a number: put it in quotes"),
    ("destinations: [{name: d}]", "destinations.0.plugin: required field is missing"),
    ("server: {log_probes: [1]}", "server.log_probes: expected true or false"),
    ("server: {port: [1]}", "server.port: expected a whole number"),
    ("server: {port: 80.5}", "server.port: expected a whole number"),
    ("storage: [1]", "storage: expected a string"),
])
def test_type_and_bound_errors_say_what_was_expected(tmp_path, text, says):
    path, _ = write(tmp_path, text + "\n")
    error = config_error(path, build=True)
    assert says in str(error) and "Input should" not in str(error)


@pytest.mark.parametrize("section, key, value", [
    ("delivery", "timeout", ".inf"), ("delivery", "rate_limit", ".inf"),
    ("dedup", "window", ".inf"), ("server", "shutdown_grace", ".nan"),
])
def test_an_infinite_duration_or_rate_is_refused(tmp_path, section, key, value):
    # YAML's .inf is a float: an infinite timeout once passed the check and then broke every
    # delivery attempt.
    if section == "delivery":
        text = f"""
            storage: memory://
            destinations:
              - name: d
                plugin: webhook
                settings: {{url: "https://a.example"}}
                delivery:
                  {key}: {value}   #!
        """
        field = f"destinations.0.delivery.{key}"
    else:
        text = f"""
            storage: memory://
            {section}:
              {key}: {value}   #!
        """
        field = f"{section}.{key}"
    path, line = write(tmp_path, text)
    error = config_error(path)
    assert_points_at(error, path, line, field)
    expected = ("a rate such as 100/s, 600/m or 3600/h" if key == "rate_limit"
                else "a duration such as 500ms, 10s, 5m, 12h or 7d")
    assert error.message == f"expected {expected}, not {value.strip('.')}"  # and what it got


@pytest.mark.parametrize("plugin, settings", [
    ("amplitude", "{api_key: k, region: '${WRONG}'}"),
    ("mixpanel", "{project_token: t, region: '${WRONG}'}"),
    ("braze", "{api_key: k, instance: '${WRONG}'}"),
])
def test_an_error_never_echoes_the_value_it_refuses(tmp_path, plugin, settings):
    # A secret put in the wrong variable must not reach the terminal through the error.
    path, line = write(tmp_path, f"""
        storage: memory://
        destinations:
          - name: d
            plugin: {plugin}
            settings: {settings}   #!
    """)
    error = config_error(path, env={"WRONG": "supersecret-0001"}, build=True)
    assert error.line == line
    assert "supersecret" not in str(error)
    path, line = write(tmp_path, """
        storage: memory://
        egress:
          allowed_networks: ["${WRONG}"]   #!
    """)
    assert "supersecret" not in str(config_error(path, env={"WRONG": "supersecret-0001"}))


@pytest.mark.parametrize("source", ["big", "/dev/zero"])
def test_a_config_over_1_mb_is_refused_without_reading_it_all(tmp_path, source):
    # /dev/zero was read whole: 1.35 GB, then a MemoryError traceback (reliability audit).
    path = Path(source)
    if source == "big":
        path = tmp_path / "router.yaml"
        path.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="over 1024 KB") as caught:
        load_config(path, env={})
    assert caught.value.file == str(path)


def test_a_config_of_exactly_1_mb_is_read_and_one_byte_more_refused(tmp_path):
    # mutation audit: refusing a config equal to the limit went unnoticed
    path = tmp_path / "router.yaml"
    head = "storage: memory://\n#"
    path.write_text(head + "x" * (1024 * 1024 - len(head) - 1) + "\n")
    assert path.stat().st_size == 1024 * 1024
    assert load_config(path, env={}).config.storage == "memory://"
    path.write_text(path.read_text() + "\n")
    with pytest.raises(ConfigError, match="over 1024 KB"):
        load_config(path, env={})


def test_a_config_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_bytes(b"storage: memory://\nserver:\n  host: caf\xe9\n")
    error = config_error(path)
    assert (error.line, error.message) == (3, "the config is not UTF-8 text")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        server:
          port: [8080   #!
        dedup: {}
    """)
    error = config_error(path)
    assert error.file == str(path)
    assert error.line is not None and line <= error.line <= line + 1
    assert str(error).startswith(f"{path}:{error.line}: ")


@pytest.mark.parametrize("text, line, hint", [
    ("server:\n\thost: 0.0.0.0\n", 2, "indent with spaces"),
    ("server:\n  host: a: b\n", 2, "which needs quotes"),
    ("server:\n  host: a\n port: 1\n", 3, "indented less or more"),
    ("server: {host: 127.0.0.1, port: ${PORT}}\n", 1, 'needs quotes: "${VAR}"'),
    ("sources:\n  - {name: web, write_keys: [${KEY}]}\n", 2, 'needs quotes: "${VAR}"'),
])
def test_common_yaml_mistakes_get_a_hint_in_plain_words(tmp_path, text, line, hint):
    # PyYAML says "mapping values are not allowed here" (newcomer audit)
    (tmp_path / "router.yaml").write_text(text)
    error = config_error(tmp_path / "router.yaml")
    assert error.line == line and hint in str(error)


def test_parse_config_reports_the_given_file_name():
    with pytest.raises(ConfigError) as caught:
        parse_config("storage: nope\n", file="inline.yaml", env={})
    assert str(caught.value).startswith("inline.yaml:1: storage: ")


def test_missing_file_is_a_config_error(tmp_path):
    error = config_error(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(error)


# -- YAML that must never run or explode ---------------------------------------------------------

@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just text\n"])
def test_a_config_that_is_not_a_mapping_says_what_it_should_be(tmp_path, text):
    # pydantic's own words were "Input should be a valid dictionary or instance of
    # RouterConfig" (mutation audit: dropping the check went unnoticed)
    path = tmp_path / "router.yaml"
    path.write_text(text)
    error = config_error(path)
    assert str(error) == (f"{path}:1: expected a mapping of sections (server, storage, "
                          "destinations, ...)")


# -- durations and rates, in each unit the docs name --------------------------------------------

DELIVERY = ("storage: memory://\ndestinations: [{{name: d, plugin: webhook, "
            "settings: {{url: 'https://a.example'}}, delivery: {{{key}: {value}}}}}]\n")


def test_every_problem_of_a_config_is_said_not_only_the_first():
    # mutation audit: the list of the other problems could lose its "(also: " unnoticed
    with pytest.raises(ConfigError) as caught:
        parse_config("storage: memory://\nserver: {port: http, max_connections: 0}\n",
                     file="f.yaml", env={})
    assert str(caught.value) == ("f.yaml:2: server.port: expected a whole number (also: "
                                 "server.max_connections: expected 1 or more)")


def test_the_defaults_are_those_docs_configuration_md_gives():
    # mutation audit: a dedup window of 11 h or dead letters kept 13 days went unnoticed
    config = parse_config("destinations: [{name: d, plugin: webhook}]\n", env={}).config
    server = config.server
    assert (server.host, server.port, server.max_request_bytes, server.max_connections,
            server.shutdown_grace, server.trusted_proxies, server.log_probes) == (
        "127.0.0.1", 8080, 512000, 1024, 30.0, [], False)
    assert config.storage == "sqlite:///var/router.db"
    assert config.dedup.window == 12 * 3600
    assert (config.egress.allow_private_addresses, config.egress.allowed_networks) == (False, [])
    assert config.delivery.own_process is False
    assert config.delivery.dead_letter_retention == 14 * 86400
    destination = config.destinations[0]
    assert (destination.settings, destination.enabled, destination.default_on,
            destination.filter) == ({}, True, True, None)


@pytest.mark.parametrize("key, least", [
    ("max_attempts", 1), ("concurrency", 1), ("batch_size", 1), ("batch_bytes", 1024),
    ("order_hold_attempts", 1), ("batch_wait", 0)])
def test_a_delivery_override_is_taken_down_to_its_least_and_refused_below(key, least):
    # mutation audit: max_attempts or concurrency of 0 allowed (nothing would ever be sent),
    # or 1 refused, went unnoticed
    text = DELIVERY.format(key=key, value=least)
    assert getattr(parse_config(text, env={}).config.destinations[0].delivery, key) == least
    with pytest.raises(ConfigError) as caught:
        parse_config(DELIVERY.format(key=key, value=least - 1), env={})
    assert caught.value.field == f"destinations.0.delivery.{key}"
    assert caught.value.message == f"expected {least} or more"


@pytest.mark.parametrize("written, seconds", [
    ("500ms", 0.5), ("10s", 10), ("10", 10), ("2.5", 2.5), ("5m", 300), ("1.5 h", 5400),
    ("12h", 43200), ("7d", 604800)])
def test_a_duration_is_read_in_each_unit(written, seconds):
    # mutation audit: minutes read as 59 s, or a unit missing from the table, went unnoticed
    loaded = parse_config(DELIVERY.format(key="max_age", value=written), env={})
    assert loaded.config.destinations[0].delivery.max_age == seconds


@pytest.mark.parametrize("written, per_second", [
    ("100", 100), ("2.5", 2.5), ("100/s", 100), ("3/sec", 3), ("4/second", 4), ("600/m", 10),
    ("120/min", 2), ("30 / minute", 0.5), ("3600/h", 1), ("7200/hour", 2)])
def test_a_rate_is_read_in_each_unit(written, per_second):
    # mutation audit: a plain number refused, any rate written with a unit refused, or a
    # minute's 60 changed, each went unnoticed
    loaded = parse_config(DELIVERY.format(key="rate_limit", value=written), env={})
    assert loaded.config.destinations[0].delivery.rate_limit == pytest.approx(per_second)


@pytest.mark.parametrize("value", [
    '!!python/object/apply:os.system ["touch {marker}"]',
    '!!python/object/apply:os.system\n    args: ["touch {marker}"]',
    "!!python/object/new:subprocess.check_call [[touch, '{marker}']]",
    "!!python/name:os.system",
])
def test_python_yaml_tags_are_refused_without_running_anything(tmp_path, value):
    marker = tmp_path / "pwned"
    first, *rest = value.format(marker=marker).split("\n")
    path, line = write(tmp_path, "\n".join(["storage: memory://", "server:",
                                            f"  port: {first}   #!", *rest]) + "\n")
    error = config_error(path)
    assert not marker.exists()
    assert error.file == str(path) and error.line == line
    assert "tag" in str(error).lower() or "unsupported" in str(error).lower()


@pytest.mark.timeout(20)
def test_billion_laughs_alias_bomb_is_refused(tmp_path):
    lines = ["storage: memory://",
             'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    lines.append("server: *a9")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    error = config_error(path)
    assert error.file == str(path)
    assert "alias" in str(error).lower() or "over" in str(error).lower()


@pytest.mark.parametrize("value", ["!!set {a, b}", "!custom {port: 1}", "!!omap [a: 1]",
                                   "!custom [1, 2]"])
def test_a_tag_on_a_mapping_or_a_list_is_refused_at_its_line(tmp_path, value):
    # Read as a plain mapping, a tag the router does not act on would pass silently
    # (mutation audit: dropping the check on collection tags went unnoticed)
    path, line = write(tmp_path, f"""
        storage: memory://
        server: {value}   #!
    """)
    error = config_error(path)
    assert_points_at(error, path, line, "server")
    assert "unsupported YAML tag" in error.message


@pytest.mark.parametrize("merged", ["5", "[[1]]", "[{port: 1}, text]"])
def test_a_merge_key_of_anything_but_mappings_is_a_config_error(tmp_path, merged):
    # It crashed with an AttributeError traceback without the check (mutation audit)
    path, line = write(tmp_path, f"""
        storage: memory://
        server:
          <<: {merged}   #!
    """)
    error = config_error(path)
    assert error.file == str(path) and error.line == line and error.field == "server"
    assert "a merge key (<<) takes a mapping or a list of mappings" in error.message


def test_yaml_anchors_and_merge_keys_work(tmp_path):
    path, _ = write(tmp_path, """
        storage: memory://
        destinations:
          - name: a
            plugin: webhook
            settings: &common
              url: https://a.example
              method: PUT
          - name: b
            plugin: webhook
            settings:
              <<: *common
              url: https://b.example
    """)
    config = load_config(path, env={}).config
    assert config.destinations[1].settings == {"url": "https://b.example", "method": "PUT"}


def test_plain_yaml_anchors_and_aliases_work(tmp_path):
    path, _ = write(tmp_path, """
        storage: memory://
        destinations:
          - name: a
            plugin: webhook
            settings: &common
              url: https://a.example
          - name: b
            plugin: webhook
            settings: *common
    """)
    config = load_config(path, env={}).config
    assert config.destinations[1].settings == {"url": "https://a.example"}


# -- plugin settings, checked when the router is built -------------------------------------------

def test_webhook_without_url_is_reported_at_its_settings(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: ok
            plugin: webhook
            settings: {url: "https://ok.example"}
          - name: broken
            plugin: webhook
            settings:   #!
              method: POST
    """)
    error = config_error(path, build=True)
    assert error.file == str(path)
    assert error.field == "destinations.1.settings.url"
    assert error.line == line  # the url has no line of its own: its settings block
    assert str(error).startswith(f"{path}:{line}: destinations.1.settings.url")


def test_webhook_with_non_http_url_is_reported_at_the_url_line(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: broken
            plugin: webhook
            settings:
              method: POST
              url: ftp://x   #!
    """)
    error = config_error(path, build=True)
    assert_points_at(error, path, line, "destinations.0.settings.url")
    assert "http" in error.message


def test_unknown_webhook_setting_is_reported(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: https://a.example
              verb: POST   #!
    """)
    assert_points_at(config_error(path, build=True), path, line,
                     "destinations.0.settings.verb")


def test_unknown_plugin_is_named_with_the_installed_ones(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: crm
            plugin: salesforcee   #!
            settings: {}
    """)
    error = config_error(path, build=True)
    assert_points_at(error, path, line, "destinations.0.plugin")
    assert "salesforcee" in str(error)
    assert "installed" in str(error) and "webhook" in str(error)


def test_every_broken_destination_is_named_not_only_the_first(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: one
            plugin: webhook
            settings: {url: "not a url"}   #!
          - name: fine
            plugin: webhook
            settings: {url: "https://a.example"}
          - name: two
            plugin: salesforcee
            settings: {}
    """)
    error = config_error(path, build=True)
    assert_points_at(error, path, line, "destinations.0.settings.url")
    assert "also: line 10: destinations.2.plugin: unknown plugin 'salesforcee'" in str(error)


@pytest.mark.parametrize(("plugin", "settings", "key", "value", "limit"), [
    ("webhook", '{url: "https://a.example"}', "batch_size", 10, 1),
    ("ga4", '{measurement_id: G-1, api_secret: s}', "batch_size", 100, 25),
    ("ga4", '{measurement_id: G-1, api_secret: s}', "batch_bytes", 1_000_000, 130_000),
    ("ga4", "{measurement_id: G-1, api_secret: s}", "max_age", "5d", "36h"),
    ("meta_capi", "{pixel_id: '123', access_token: t}", "max_age", "7d", "84h"),
])
def test_a_delivery_setting_past_the_plugins_limit_is_refused(tmp_path, plugin, settings, key,
                                                              value, limit):
    # A webhook request carries one event (a batch of 10 would fail every send), and GA4
    # drops what is past its 25 events a request without an error. GA4 drops events
    # backdated over 72 h, Meta refuses them over 7 days: with a max_age that long, no event
    # would leave time for its retries, and every one was refused.
    path, line = write(tmp_path, f"""
        storage: memory://
        destinations:
          - name: d
            plugin: {plugin}
            settings: {settings}
            delivery:
              {key}: {value}   #!
    """)
    error = config_error(path, build=True)
    assert_points_at(error, path, line, f"destinations.0.delivery.{key}")
    assert f"expected at most {limit}" in error.message
    if plugin == "webhook":
        assert "a webhook request carries at most 1 payload (" in error.message


def test_a_breaker_for_per_user_order_without_per_user_order_is_refused(tmp_path):
    # Valid alone, it did nothing without ordered: true, and the operator was not told.
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: d
            plugin: webhook
            settings: {url: "https://a.example"}
            delivery: {order_hold_attempts: 5}   #!
    """)
    error = config_error(path, build=True)
    assert_points_at(error, path, line, "destinations.0.delivery.order_hold_attempts")
    assert "set without ordered: true" in error.message
    # A plugin may declare one for operators who turn ordering on.
    assert DeliveryDefaults(order_hold_attempts=5).order_hold_attempts == 5


def test_delivery_settings_within_the_plugins_limits_are_allowed(tmp_path):
    path, _ = write(tmp_path, """
        storage: memory://
        destinations:
          - name: d
            plugin: ga4
            settings: {measurement_id: G-1, api_secret: s}
            delivery: {batch_size: 5, batch_bytes: 65536, max_age: 36h}
    """)
    (destination,) = router_for(path).destinations
    assert destination.adapter.delivery == destination.delivery
    assert (destination.delivery.batch_size, destination.delivery.batch_bytes,
            destination.delivery.max_age) == (5, 65536, 36 * 3600)


@pytest.mark.parametrize(("plugin", "other", "key", "url", "why", "hint"), [
    ("webhook", "method: POST", "url", "http://127.0.0.1:8080/in", "loopback",
     "set egress.allow_private_addresses"),
    ("segment", "write_key: k-0001", "base_url", "https://10.0.0.5", "private",
     "set egress.allow_private_addresses"),
    ("webhook", "method: POST", "url", "http://169.254.169.254/in", "metadata",
     "only listing the metadata address's own network"),
    ("webhook", "method: POST", "url", "http://134744072/in", "write it as 8.8.8.8", None),
])
def test_a_private_endpoint_is_refused_at_the_setting_that_names_it(tmp_path, plugin, other,
                                                                     key, url, why, hint):
    path, line = write(tmp_path, f"""
        storage: memory://
        destinations:
          - name: d
            plugin: {plugin}
            settings:
              {other}
              {key}: {url}   #!
    """)
    error = config_error(path, build=True)
    assert_points_at(error, path, line, f"destinations.0.settings.{key}")
    assert "egress refused" in error.message and why in error.message
    if hint:
        assert hint in error.message  # how the config could allow it, where it can
    else:
        assert "egress.allow" not in error.message


def test_disabled_destination_is_not_built(tmp_path):
    path, _ = write(tmp_path, """
        storage: memory://
        destinations:
          - name: primary
            plugin: webhook
            settings: {url: "https://a.example"}
          - name: muted
            plugin: webhook
            enabled: false
            settings: {url: "https://b.example"}
    """)
    assert [d.name for d in router_for(path).destinations] == ["primary"]


def test_template_syntax_error_in_mapping_is_reported_at_its_field(tmp_path):
    path, line = write(tmp_path, """
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings: {url: "https://a.example"}
            mapping:
              properties:
                total: "{{ event.properties.total "   #!
    """)
    error = config_error(path, build=True)
    assert_points_at(error, path, line, "destinations.0.mapping.properties.total")


# -- secrets never reach an error ----------------------------------------------------------------

SECRET_CASES = {
    "write keys not a list": """
        storage: memory://
        sources:
          - name: web
            write_keys: ${SECRET}
    """,
    "write key beside a bad field": """
        storage: memory://
        sources:
          - name: web
            write_keys: ["${SECRET}"]
            writekeys: ["${SECRET}"]
    """,
    "header beside a bad url": """
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: ftp://${SECRET}
              headers:
                X-Api-Key: ${SECRET}
    """,
    "headers not a map": """
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: https://a.example
              headers: ${SECRET}
    """,
    "secret in a method": """
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: https://a.example
              method: ${SECRET}
    """,
    "secret in a port": """
        storage: memory://
        server:
          port: ${SECRET}
    """,
    "secret in a duration": """
        storage: memory://
        dedup:
          window: ${SECRET}
    """,
    "secret in a storage url": """
        storage: rediss://:${SECRET}@cache.example:6379/0
    """,
    # a secret in a field that names something (security review): the name was quoted
    "secret as a plugin name": """
        storage: memory://
        destinations:
          - name: hook
            plugin: "${SECRET}"
    """,
    "secret as a storage option": """
        storage: "sqlite:///x.db?${SECRET}=1"
    """,
    "secret with a line break": """
        storage: memory://
        destinations:
          - name: hook
            plugin: webhook
            settings:
              url: https://a.example
              headers:
                Authorization: Bearer ${SECRET_NL}
    """,
}


@pytest.mark.parametrize("text", SECRET_CASES.values(), ids=SECRET_CASES.keys())
def test_secrets_never_appear_in_config_errors(tmp_path, text):
    path, _ = write(tmp_path, text)
    env = {"SECRET": SECRET, "SECRET_NL": f"{SECRET}\r\nX: y"}
    error = config_error(path, env=env, build=True)
    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert SECRET not in (error.message or "")


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000])
def test_a_config_nested_too_deeply_to_read_says_so(tmp_path, text):
    # PyYAML's parser recurses: a RecursionError and a traceback thousands of lines long
    # (security review).
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    error = config_error(path)
    assert "nests too deeply" in error.message and error.file == str(path)


@pytest.mark.parametrize("section, key", [("server", "trusted_proxies"),
                                          ("egress", "allowed_networks")])
def test_a_network_list_names_the_entry_that_is_not_a_network(tmp_path, section, key):
    path, line = write(tmp_path, f"""
        storage: memory://
        {section}:
          {key}: ["10.0.0.0/8", "proxy.internal"]   #!
    """)
    error = config_error(path)
    assert_points_at(error, path, line, f"{section}.{key}")
    assert "entry 1 is not a network such as 10.1.0.0/16" in error.message
    assert "proxy.internal" not in str(error)


@pytest.mark.parametrize("section, key", [("server", "trusted_proxies"),
                                          ("egress", "allowed_networks")])
def test_a_number_is_not_a_network(tmp_path, section, key):
    # ipaddress reads 10 as 0.0.0.10/32 (mutation audit: dropping the check went unnoticed)
    path, line = write(tmp_path, f"""
        storage: memory://
        {section}:
          {key}: [10]   #!
    """)
    error = config_error(path)
    assert_points_at(error, path, line, f"{section}.{key}")
    assert "entry 0 is not a network such as 10.1.0.0/16" in error.message


@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3", "::g", "my host", "-bad.example"])
def test_a_listen_address_that_is_neither_an_address_nor_a_name_fails_at_load(tmp_path, host):
    # 999.1.1.1 passed `router check`, and `router serve` then failed with no file or line.
    path, line = write(tmp_path, f"""
        storage: memory://
        server:
          host: "{host}"   #!
    """)
    error = config_error(path)
    assert_points_at(error, path, line, "server.host")
    assert "expected an IP address such as 0.0.0.0 or ::, or a host name" in error.message


@pytest.mark.parametrize("host, read", [("", ""), ("0.0.0.0", "0.0.0.0"), ("::", "::"),
                                        ("[::1]", "::1"), ("localhost", "localhost"),
                                        ("router.internal", "router.internal")])
def test_listen_addresses_and_names_are_taken(host, read):
    text = f'storage: memory://\nserver:\n  host: "{host}"\n'
    assert parse_config(text, file="t.yaml", env={}).config.server.host == read


@pytest.mark.parametrize(("text", "value", "problem"), [
    ("destinations:\n  - name: amp\n    plugin: amplitude\n    settings: {api_key: '${KEY}'}\n",
     "", "destinations.0.settings.api_key: is empty"),
    ("destinations:\n  - name: amp\n    plugin: amplitude\n    settings: {api_key: '${KEY}'}\n",
     "abc123 ", "destinations.0.settings.api_key: begins or ends with a space"),
    ("sources:\n  - name: web\n    write_keys: ['${KEY}']\n", " wk1",
     "sources.0.write_keys.0: begins or ends with a space"),
    ("sources:\n  - name: web\n    write_keys: ['${KEY}']\n", "  ",
     "sources.0.write_keys.0: is empty"),
])
def test_a_secret_set_to_nothing_or_with_a_stray_space_fails_at_start(text, value, problem):
    # A missing Kubernetes secret gives "": `router check` said OK, then every event failed
    # at the vendor; a write key with a space made every client's request 401 (deployment
    # audit).
    with pytest.raises(ConfigError) as caught:
        Router(parse_config("storage: memory://\n" + text, file="r.yaml", env={"KEY": value}),
               registry=create_registry(), deliver=False)
    assert str(caught.value).startswith("r.yaml:") and problem in str(caught.value)
    assert value.strip() == "" or value.strip() not in str(caught.value)
