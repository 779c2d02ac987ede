"""Config loading: defaults, every validation rule by its key path, YAML errors, paths, dumps."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import trustme

from spamkiller import config as cfg
from spamkiller.errors import ConfigError
from spamkiller.units import Rate, format_duration, format_size, parse_duration, parse_size

PIN = "sha256/" + "A" * 43 + "="  # 32 zero bytes, base64


def write(tmp_path: Path, text: str, name: str = "spam-killer.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        cfg.load(write(tmp_path, text))
    return caught.value.problems


def assert_problem(tmp_path: Path, text: str, expected: str) -> None:
    """`expected` is the exact line, or how it starts when it ends with a space."""
    found = problems_of(tmp_path, text)
    if expected.endswith(" "):
        assert any(line.startswith(expected) for line in found), found
    else:
        assert expected in found, found


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("250ms", 0.25),
        (" 5 M ", 300.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-1", -1, "1h30m", "five", "inf", float("nan"), True])
def test_parse_duration_refuses(text: str | int | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (2048, 2048),
        ("2048", 2048),
        ("50MiB", 50 * 1024**2),
        ("10MB", 10_000_000),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("100kB", 100_000),
        ("100KB", 100_000),
        ("1mib", 1024**2),
        ("1.5KiB", 1536),
        ("7B", 7),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "10XB", "-5", -5, "0.5B", "MiB", True])
def test_parse_size_refuses(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("seconds", [0, 0.25, 1, 1.5, 30, 90, 300, 5400, 86400, 604800, 1e-5])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_picks_the_largest_exact_unit() -> None:
    assert format_duration(300) == "5m"
    assert format_duration(0.25) == "250ms"
    assert format_duration(604800) == "7d"


@pytest.mark.parametrize("size", [0, 7, 1000, 1024, 1536, 50 * 1024**2, 10**7, 2 * 1024**3])
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_picks_the_largest_exact_unit() -> None:
    assert format_size(50 * 1024**2) == "50MiB"
    assert format_size(10**7) == "10MB"
    assert format_size(7) == "7B"


# ---------------------------------------------------------------------------------------------
# defaults and basic loading
# ---------------------------------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    config = cfg.load(None)
    assert config.domains == ["localhost"]
    assert [(li.name, li.address, li.port, li.tls) for li in config.listeners] == [
        ("mx", "127.0.0.1", 2525, "starttls")
    ]
    assert config.upstream.targets == ("127.0.0.1",)
    assert config.upstream.port == 2526
    assert config.upstream.use_tls is False
    assert config.upstream.verify_cert is True
    assert config.upstream.timeout == 300.0
    assert config.upstream.data_timeout == 600.0
    assert config.dev_upstream.enabled is True
    assert config.dev_maildir == Path("spam-killer-data") / "maildir"
    assert config.limits.max_message_size == 50 * 1024**2
    assert config.limits.command_timeout == 300.0
    assert config.limits.data_timeout == 180.0
    assert config.tls.min_version == "TLSv1.2"
    assert config.tls.handshake_timeout == 30.0
    assert config.state is None
    assert config.state_url == "sqlite:///spam-killer-data/state.db"
    assert config.workers == 1
    assert config.shutdown_timeout == 30.0
    assert config.log.format == "text"
    assert cfg.Config.model_validate({}) == config


def test_default_hostname_falls_back_when_the_fqdn_is_no_dns_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "Build_Box.Example")
    assert cfg.load(None).hostname == "localhost"
    monkeypatch.setattr("socket.getfqdn", lambda: "MX1.Example.Org")
    assert cfg.load(None).hostname == "mx1.example.org"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    loaded = cfg.load(write(tmp_path, text))
    assert loaded.limits == cfg.LimitsConfig()
    assert loaded.listeners == cfg.load(None).listeners


def test_models_are_frozen() -> None:
    config = cfg.load(None)
    with pytest.raises(ValueError):
        config.workers = 2


def test_contract_example_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        hostname: MX.Example.COM.
        domains: [example.com, Example.com, example.org]
        listeners:
          - name: mx
            address: 0.0.0.0
            port: 25
            tls: starttls
            require_tls: false
            trusted_proxies: [127.0.0.1, 10.0.0.0/8]
          - {name: submission, address: 0.0.0.0, port: 587, tls: starttls, require_tls: true}
          - {name: smtps, address: "::", port: 465, tls: implicit}
          - name: internal
            address: 10.0.0.2
            port: 2526
            require_tls: true
            client_cert: required
            client_ca_file: internal-ca.pem
            client_cert_pins: ["PIN"]
        tls:
          certificates:
            - {cert: /etc/spam-killer/rsa.pem, key: /etc/spam-killer/rsa.key}
          min_version: TLSv1.3
        upstream:
          host: mail.example.com
          port: 25
          use_tls: true
          timeout: 5m
        limits:
          max_message_size: 10MB
          command_timeout: 90
        state: redis://localhost:6379/0
        log: {format: json}
        """.replace("PIN", PIN),
    )
    config = cfg.load(path)
    assert config.hostname == "mx.example.com"
    assert config.domains == ["example.com", "example.org"]
    assert config.listeners[0].trusted_proxies == ["127.0.0.1/32", "10.0.0.0/8"]
    assert config.listeners[2].address == "::"
    assert config.listeners[3].client_ca_file == tmp_path / "internal-ca.pem"
    assert config.listeners[3].client_cert_pins == [PIN]
    assert config.upstream.targets == ("mail.example.com",)
    assert config.limits.max_message_size == 10_000_000
    assert config.limits.command_timeout == 90.0
    assert config.tls.min_version == "TLSv1.3"
    assert config.log.format == "json"


def test_upstream_hosts_in_order(tmp_path: Path) -> None:
    config = cfg.load(write(tmp_path, "upstream: {hosts: [b.example, 10.0.0.5, '[::1]']}"))
    assert config.upstream.targets == ("b.example", "10.0.0.5", "::1")


# ---------------------------------------------------------------------------------------------
# file and YAML errors
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        cfg.load(tmp_path / "nope.yaml")
    assert caught.value.problems == [f"{tmp_path / 'nope.yaml'}: no such file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 2\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match="not readable"):
        cfg.load(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        cfg.load(tmp_path)


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 2\nlimits:\n  max_recipients: [1, 2\nlog: {}\n")
    with pytest.raises(ConfigError) as caught:
        cfg.load(path)
    [line] = caught.value.problems
    assert line.startswith(f"{path}: line 4, column 4: ")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 2\nlog: {format: json}\nworkers: 3\n")
    with pytest.raises(ConfigError) as caught:
        cfg.load(path)
    [line] = caught.value.problems
    assert line == f"{path}: line 3, column 1: found duplicate key 'workers'"


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = """
    listeners:
      - &base {name: a, port: 2525, address: 127.0.0.1}
      - {<<: *base, name: b, port: 2527}
    """
    config = cfg.load(write(tmp_path, text))
    assert [(li.name, li.port) for li in config.listeners] == [("a", 2525), ("b", 2527)]


@pytest.mark.parametrize("text", ["[1, 2]\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    [line] = problems_of(tmp_path, text)
    assert line.startswith("(top level): must be a mapping of keys to values")


def test_unknown_key_at_top_level(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "bogus: 1\n") == ["bogus: unknown key"]


def test_unknown_key_nested(tmp_path: Path) -> None:
    text = (
        "listeners:\n  - {name: mx, port: 25, bogus: 1}\n"
        "tls: {certificates: [{cert: a, key: b, x: 1}]}\n"
    )
    assert problems_of(tmp_path, text) == [
        "listeners.0.bogus: unknown key",
        "tls.certificates.0.x: unknown key",
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = "workers: 0\nlimits: {max_recipients: 0}\nlog: {format: xml}\n"
    found = problems_of(tmp_path, text)
    assert [line.split(":")[0] for line in found] == [
        "limits.max_recipients",
        "workers",
        "log.format",
    ]


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "limits: 5\n") == [
        "limits: must be a mapping of keys to values, got int"
    ]


def test_section_must_be_a_list(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "listeners: {name: mx}\n") == [
        "listeners: must be a list, got a mapping"
    ]


# ---------------------------------------------------------------------------------------------
# every validation rule, by key path
# ---------------------------------------------------------------------------------------------

L = "listeners:\n  - {name: mx, port: 2525, %s}\n"


RULES: list[tuple[str, str]] = [
    # hostname and domains
    ("hostname: bad_name.example\n", "hostname: "),
    ("hostname: -lead.example\n", "hostname: "),
    ("hostname: " + "a" * 64 + ".example\n", "hostname: "),
    (
        "hostname: " + ".".join(["abcdefghi"] * 26) + "\n",
        "hostname: must be at most 253 characters, got 259",
    ),
    ("hostname: bücher.example\n", "hostname: "),
    ("hostname: ''\n", "hostname: must be a DNS name, got an empty string"),
    ("hostname: 42\n", "hostname: must be a valid string, got 42"),
    ("domains: []\n", "domains: at least one domain is needed"),
    ("domains: [ok.example, 'no spaces.example']\n", "domains.1: "),
    # listeners
    ("listeners: []\n", "listeners: at least one listener is needed"),
    ("listeners:\n  - {name: mx}\n", "listeners.0.port: required"),
    ("listeners:\n  - {port: 25}\n", "listeners.0.name: required"),
    ("listeners:\n  - {name: mx, port: 0}\n", "listeners.0.port: must be between 1 and 65535"),
    ("listeners:\n  - {name: mx, port: 65536}\n", "listeners.0.port: must be between 1 and 65535"),
    ("listeners:\n  - {name: mx, port: true}\n", "listeners.0.port: "),
    ("listeners:\n  - {name: 'm x', port: 25}\n", "listeners.0.name: "),
    ("listeners:\n  - {name: '', port: 25}\n", "listeners.0.name: "),
    (L % "address: localhost", "listeners.0.address: 'localhost' is not an IPv4 or IPv6 address"),
    (L % "tls: yes-please", "listeners.0.tls: "),
    (
        L % "tls: none, require_tls: true",
        "listeners.0.require_tls: needs tls: starttls or implicit",
    ),
    (L % "proxy_protocol: true", "listeners.0.trusted_proxies: required when proxy_protocol "),
    (
        L % "greet_delay: 2m",
        "listeners.0.greet_delay: must be at most 30s: senders give up at 5 minutes",
    ),
    (
        L % "greet_delay: 2s, tls: implicit",
        "listeners.0.greet_delay: has no meaning with tls: implicit (TLS speaks first)",
    ),
    (
        L % "proxy_protocol: true, trusted_proxies: [127.0.0.1], tls: implicit",
        "listeners.0.proxy_protocol: is not supported with tls: implicit",
    ),
    (L % "proxy_protocol: true, trusted_proxies: [10.0.0.300]", "listeners.0.trusted_proxies.0: "),
    (L % "client_cert: sometimes", "listeners.0.client_cert: "),
    (L % "client_cert: required", "listeners.0.client_ca_file: required when client_cert is "),
    (
        L % f"client_cert: optional, client_cert_pins: ['{PIN}']",
        "listeners.0.client_ca_file: required when client_cert is optional ",
    ),
    (
        L % "tls: none, client_cert: required, client_ca_file: ca.pem",
        "listeners.0.client_cert: needs tls: starttls or implicit",
    ),
    (
        L % f"client_cert_pins: ['{PIN}']",
        "listeners.0.client_cert_pins: have no effect unless client_cert is optional or required",
    ),
    (L % "client_ca_file: ca.pem", "listeners.0.client_ca_file: has no effect "),
    (
        L % "client_cert: required, client_ca_file: ca.pem, client_cert_pins: [md5/abc]",
        "listeners.0.client_cert_pins.0: ",
    ),
    (
        L % "client_cert: required, client_ca_file: ca.pem, client_cert_pins: ['sha256/AAAA']",
        "listeners.0.client_cert_pins.0: 'sha256/AAAA': decodes to 3 bytes, a SHA-256 pin has 32",
    ),
    (
        L % "client_cert: required, client_ca_file: ca.pem, client_cert_pins: ['sha256/!!']",
        "listeners.0.client_cert_pins.0: 'sha256/!!': the part after sha256/ is not base64",
    ),
    (
        "listeners:\n  - {name: a, port: 25}\n  - {name: a, port: 26}\n",
        "listeners.1.name: duplicate name 'a' (also listeners.0)",
    ),
    (
        "listeners:\n  - {name: a, port: 25, address: 10.0.0.1}\n"
        "  - {name: b, port: 25, address: 10.0.0.1}\n",
        "listeners.1.port: 10.0.0.1 port 25 overlaps listeners.0 (10.0.0.1)",
    ),
    (
        "listeners:\n  - {name: a, port: 25, address: 0.0.0.0}\n"
        "  - {name: b, port: 25, address: 10.0.0.1}\n",
        "listeners.1.port: 10.0.0.1 port 25 overlaps listeners.0 (0.0.0.0)",
    ),
    (
        "listeners:\n  - {name: a, port: 2526, address: 127.0.0.1}\n",
        "dev_upstream.port: 127.0.0.1 port 2526 overlaps listeners.0",
    ),
    # tls
    ("tls: {min_version: TLSv1.1}\n", "tls.min_version: "),
    ("tls: {handshake_timeout: 0}\n", "tls.handshake_timeout: must be longer than 0s"),
    ("tls: {handshake_timeout: soon}\n", "tls.handshake_timeout: "),
    ("tls: {certificates: [{cert: a.pem}]}\n", "tls.certificates.0.key: required"),
    (
        "tls: {certificates: [{cert: '', key: a.key}]}\n",
        "tls.certificates.0.cert: must be a path, got an empty string",
    ),
    # upstream
    (
        "upstream: {host: a.example, hosts: [b.example]}\n",
        "upstream.hosts: give host or hosts, not both",
    ),
    ("upstream: {host: 'not a host'}\n", "upstream.host: "),
    ("upstream: {hosts: [ok.example, 'x y']}\n", "upstream.hosts.1: "),
    ("upstream: {port: 70000}\n", "upstream.port: must be between 1 and 65535"),
    ("upstream: {client_cert: c.pem}\n", "upstream.client_key: required with client_cert"),
    ("upstream: {client_key: c.key}\n", "upstream.client_cert: required with client_key"),
    ("upstream: {server_name: 'a b'}\n", "upstream.server_name: "),
    ("upstream: {timeout: -5}\n", "upstream.timeout: must not be negative, got -5"),
    ("upstream: {connect_timeout: 0s}\n", "upstream.connect_timeout: must be longer than 0s"),
    ("upstream: {data_timeout: [1]}\n", "upstream.data_timeout: "),
    ("upstream: {use_tls: maybe}\n", "upstream.use_tls: "),
    # dev upstream
    ("dev_upstream: {address: nowhere}\n", "dev_upstream.address: "),
    ("dev_upstream: {port: 0}\n", "dev_upstream.port: must be between 1 and 65535"),
    # limits
    (
        "limits: {max_message_size: 1000}\n",
        "limits.max_message_size: must be between 1KiB and 2GiB",
    ),
    (
        "limits: {max_message_size: 3GiB}\n",
        "limits.max_message_size: must be between 1KiB and 2GiB",
    ),
    ("limits: {max_message_size: lots}\n", "limits.max_message_size: "),
    ("limits: {max_recipients: 0}\n", "limits.max_recipients: must be between 1 and 100000"),
    (
        "limits: {max_command_length: 100}\n",
        "limits.max_command_length: must be at least 512 (RFC 5321 4.5.3.1.4)",
    ),
    (
        "limits: {max_line_length: 998}\n",
        "limits.max_line_length: must be at least 1000 (RFC 5321 4.5.3.1.6)",
    ),
    ("limits: {max_bad_commands: 0}\n", "limits.max_bad_commands: must be at least 1"),
    ("limits: {command_timeout: 0}\n", "limits.command_timeout: must be longer than 0s"),
    ("limits: {data_timeout: 1x}\n", "limits.data_timeout: "),
    ("limits: {max_connections: 0}\n", "limits.max_connections: must be at least 1"),
    (
        "limits: {max_connections: 10, max_connections_per_ip: 11}\n",
        "limits.max_connections_per_ip: must not exceed max_connections (10)",
    ),
    # the rest
    (
        "state: postgres://db/x\n",
        "state: must start with sqlite:///, redis://, rediss://, redis-sentinel://,"
        " rediss-sentinel://, redis-cluster:// or rediss-cluster://",
    ),
    ("workers: 0\n", "workers: must be between 1 and 64"),
    ("workers: 65\n", "workers: must be between 1 and 64"),
    ("workers: 2.5\n", "workers: "),
    ("shutdown_timeout: -1s\n", "shutdown_timeout: "),
    ("log: {format: xml}\n", "log.format: must be 'text' or 'json', got 'xml'"),
    ("data_dir: ''\n", "data_dir: must be a path, got an empty string"),
    # recipients
    (
        "recipients: {known: {example.com: [alice]}}\n",
        "recipients.known.example.com: is not one of domains",
    ),
    (
        "domains: [example.com]\nrecipients: {known: {example.com: [alice, 'a@b']}}\n",
        "recipients.known.example.com.1: 'a@b' must not contain @ ",
    ),
    (
        "domains: [example.com]\nrecipients: {known: {example.com: ['al ice']}}\n",
        "recipients.known.example.com.0: 'al ice' must not contain spaces or control characters",
    ),
    (
        "domains: [example.com]\nrecipients: {known: {example.com: ['']}}\n",
        "recipients.known.example.com.0: must be a local part, got an empty string",
    ),
    (
        "domains: [example.com]\nrecipients: {known: {example.com: ['" + "a" * 65 + "']}}\n",
        "recipients.known.example.com.0: ",
    ),
    (
        "domains: [example.com]\nrecipients: {known: {example.com: [alice, 42]}}\n",
        "recipients.known.example.com.1: must be a valid string, got 42",
    ),
    (
        "domains: [example.com]\nrecipients: {known: {example.com: alice}}\n",
        "recipients.known.example.com: must be a list, got str",
    ),
    ("recipients: {known: {'bad name.example': [a]}}\n", "recipients.known.bad name.example: "),
    ("recipients: {delimiter: '@'}\n", "recipients.delimiter: '@' cannot separate "),
    ("recipients: {delimiter: '+.'}\n", "recipients.delimiter: '.' cannot separate "),
    ("recipients: {max_unknown: -1}\n", "recipients.max_unknown: must be at least 0"),
    ("recipients: {max_unknown: true}\n", "recipients.max_unknown: "),
    ("recipients: {files: ['']}\n", "recipients.files.0: must be a path, got an empty string"),
    ("recipients: {typo: 1}\n", "recipients.typo: unknown key"),
    # state
    (
        "state: 'sqlite:///'\n",
        "state: sqlite:/// needs a path: sqlite:///state.db or sqlite:////abs/state.db",
    ),
    ("state: 'sqlite:///  '\n", "state: sqlite:/// needs a path: "),
    ("state: sqlite://state.db\n", "state: must start with sqlite:///, "),
    ("state: 'redis://'\n", "state: redis URL needs a host: redis://host:6379/0"),
    ("state: 'redis:///0'\n", "state: redis URL needs a host: redis://host:6379/0"),
    ("state: 'redis://user:secret@/0'\n", "state: redis URL needs a host: redis://host:6379/0"),
    ("state: 'rediss://'\n", "state: redis URL needs a host: redis://host:6379/0"),
    ("state: postgresql://db.example/spam\n", "state: must start with sqlite:///, "),
    ("state: ''\n", "state: must start with sqlite:///, "),
    ("state_timeout: 0\n", "state_timeout: must be longer than 0s"),
    ("state_timeout: soon\n", "state_timeout: "),
    # rate_limits
    (
        "rate_limits: {connections_per_ip: 100}\n",
        "rate_limits.connections_per_ip: expected a count per duration such as 100/1m, 20/h or "
        "5000/1d, or off, got 100",
    ),
    (
        "rate_limits: {connections_per_ip: 100/1x}\n",
        "rate_limits.connections_per_ip: '100/1x': unknown duration unit 'x' in '1x': ",
    ),
    (
        "rate_limits: {connections_per_ip: 0/1m}\n",
        "rate_limits.connections_per_ip: '0/1m': the count and the duration must be above zero, "
        "or say off",
    ),
    (
        "rate_limits: {connections_per_ip: 10/0s}\n",
        "rate_limits.connections_per_ip: '10/0s': the count and the duration must be above zero, "
        "or say off",
    ),
    (
        "rate_limits: {connections_per_ip: per-minute}\n",
        "rate_limits.connections_per_ip: expected a count per duration such as 100/1m, 20/h or "
        "5000/1d, or off, got 'per-minute'",
    ),
    (
        "rate_limits: {connections_per_ip: 1.5}\n",
        "rate_limits.connections_per_ip: expected a rate such as 100/1m or off, got float",
    ),
    (
        "rate_limits: {connections_per_ip: [100, 1m]}\n",
        "rate_limits.connections_per_ip: expected a rate such as 100/1m or off, got a list",
    ),
    (
        "rate_limits: {connections_per_ip: true}\n",
        "rate_limits.connections_per_ip: expected a count per duration such as 100/1m, 20/h or "
        "5000/1d, or off, got a boolean",
    ),
    ("rate_limits: {messages_per_network: 5/1h30m}\n", "rate_limits.messages_per_network: "),
    ("rate_limits: {ipv4_prefix: 7}\n", "rate_limits.ipv4_prefix: must be between 8 and 32"),
    ("rate_limits: {ipv4_prefix: 33}\n", "rate_limits.ipv4_prefix: must be between 8 and 32"),
    ("rate_limits: {ipv6_prefix: 15}\n", "rate_limits.ipv6_prefix: must be between 16 and 128"),
    ("rate_limits: {ipv6_prefix: 129}\n", "rate_limits.ipv6_prefix: must be between 16 and 128"),
    ("rate_limits: {concurrent_per_ip: -1}\n", "rate_limits.concurrent_per_ip: must be at least 0"),
    ("rate_limits: {concurrent_per_network: yes}\n", "rate_limits.concurrent_per_network: "),
    ("rate_limits: {slot_ttl: 0}\n", "rate_limits.slot_ttl: must be longer than 0s"),
    ("rate_limits: {timeout: 0}\n", "rate_limits.timeout: must be longer than 0s"),
    (
        "rate_limits: {exempt: [10.0.0.0/8, intranet]}\n",
        "rate_limits.exempt.1: 'intranet' is not an IP address or CIDR network",
    ),
    (
        "rate_limits: {on_error: ignore}\n",
        "rate_limits.on_error: must be 'accept' or 'tempfail', got 'ignore'",
    ),
    (
        "rate_limits: {connections_per_minute: 5}\n",
        "rate_limits.connections_per_minute: unknown key",
    ),
    # greylist
    ("greylist: {delay: 2d}\n", "greylist.delay: must be shorter than retry_window (2d)"),
    (
        "greylist: {delay: 1h, retry_window: 1h}\n",
        "greylist.delay: must be shorter than retry_window (1h)",
    ),
    (
        "greylist: {retry_window: 40d}\n",
        "greylist.retry_window: must not be longer than expire (35d)",
    ),
    (
        "greylist: {retry_window: 2d, expire: 1d}\n",
        "greylist.retry_window: must not be longer than expire (1d)",
    ),
    ("greylist: {delay: -1}\n", "greylist.delay: must not be negative, got -1"),
    ("greylist: {expire: 0}\n", "greylist.expire: must be longer than 0s"),
    ("greylist: {ipv4_prefix: 7}\n", "greylist.ipv4_prefix: must be between 8 and 32"),
    ("greylist: {ipv4_prefix: 33}\n", "greylist.ipv4_prefix: must be between 8 and 32"),
    ("greylist: {ipv6_prefix: 15}\n", "greylist.ipv6_prefix: must be between 16 and 128"),
    ("greylist: {ipv6_prefix: 129}\n", "greylist.ipv6_prefix: must be between 16 and 128"),
    ("greylist: {auto_pass_accepted: -1}\n", "greylist.auto_pass_accepted: must be at least 0"),
    (
        "greylist: {auto_pass_tls_sessions: -1}\n",
        "greylist.auto_pass_tls_sessions: must be at least 0",
    ),
    ("greylist: {min_score: low}\n", "greylist.min_score: "),
    ("greylist: {exempt: ['10.0.0.300']}\n", "greylist.exempt.0: "),
    (
        "greylist: {on_error: maybe}\n",
        "greylist.on_error: must be 'accept' or 'tempfail', got 'maybe'",
    ),
    ("greylist: {triplet_expire: 1d}\n", "greylist.triplet_expire: unknown key"),
    # pass_cache and tarpit
    ("pass_cache: {ttl: 0}\n", "pass_cache.ttl: must be longer than 0s"),
    ("pass_cache: {on_error: accept}\n", "pass_cache.on_error: unknown key"),
    ("pass_cache: {size: 1000}\n", "pass_cache.size: unknown key"),
    ("tarpit: {delay: 61s}\n", "tarpit.delay: must be at most 1m"),
    ("tarpit: {delay: 5m}\n", "tarpit.delay: must be at most 1m"),
    ("tarpit: {delay: 0}\n", "tarpit.delay: must be longer than 0s"),
    ("tarpit: {min_score: high}\n", "tarpit.min_score: "),
    ("tarpit: {max_delay: 10s}\n", "tarpit.max_delay: unknown key"),
]


@pytest.mark.parametrize(
    ("text", "expected"), RULES, ids=[expected.split(":")[0] for _, expected in RULES]
)
def test_validation_rule(tmp_path: Path, text: str, expected: str) -> None:
    assert_problem(tmp_path, text, expected)


def test_dev_upstream_port_overlap_ignored_when_disabled(tmp_path: Path) -> None:
    text = "listeners:\n  - {name: a, port: 2526}\ndev_upstream: {enabled: false}\n"
    assert cfg.load(write(tmp_path, text)).listeners[0].port == 2526


def test_same_port_on_different_addresses_is_fine(tmp_path: Path) -> None:
    text = (
        "listeners:\n  - {name: a, port: 25, address: 10.0.0.1}\n"
        "  - {name: b, port: 25, address: 10.0.0.2}\n  - {name: c, port: 25, address: '::'}\n"
    )
    assert len(cfg.load(write(tmp_path, text)).listeners) == 3


def test_durations_and_sizes_in_a_file(tmp_path: Path) -> None:
    text = """
    shutdown_timeout: 250ms
    tls: {handshake_timeout: 1m}
    upstream: {timeout: 2h, data_timeout: 600, connect_timeout: "7.5"}
    limits: {max_message_size: 512KiB, command_timeout: 1d, data_timeout: 3m}
    """
    config = cfg.load(write(tmp_path, text))
    assert config.shutdown_timeout == 0.25
    assert config.tls.handshake_timeout == 60.0
    assert config.upstream.timeout == 7200.0
    assert config.upstream.data_timeout == 600.0
    assert config.upstream.connect_timeout == 7.5
    assert config.limits.max_message_size == 512 * 1024
    assert config.limits.command_timeout == 86400.0


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = """
    data_dir: data
    tls: {certificates: [{cert: certs/a.pem, key: /abs/a.key}]}
    upstream: {ca_file: ../ca.pem, client_cert: c.pem, client_key: c.key}
    dev_upstream: {maildir: mail}
    listeners:
      - {name: i, port: 2525, client_cert: optional, client_ca_file: clients.pem}
    """
    config = cfg.load(write(conf_dir, text))
    assert config.data_dir == conf_dir / "data"
    assert config.tls.certificates[0].cert == conf_dir / "certs/a.pem"
    assert config.tls.certificates[0].key == Path("/abs/a.key")
    assert config.upstream.ca_file == conf_dir / "../ca.pem"
    assert config.upstream.client_cert == conf_dir / "c.pem"
    assert config.upstream.client_key == conf_dir / "c.key"
    assert config.dev_upstream.maildir == conf_dir / "mail"
    assert config.dev_maildir == conf_dir / "mail"
    assert config.listeners[0].client_ca_file == conf_dir / "clients.pem"


def test_relative_config_path_still_resolves_to_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", "data_dir: data\n")
    monkeypatch.chdir(tmp_path)
    config = cfg.load("etc/spam-killer.yaml")
    assert config.data_dir == tmp_path / "etc" / "data"


# ---------------------------------------------------------------------------------------------
# dumps
# ---------------------------------------------------------------------------------------------


def test_model_dump_works() -> None:
    dumped = cfg.load(None).model_dump()
    assert dumped["limits"]["max_message_size"] == 50 * 1024**2
    assert dumped["upstream"]["timeout"] == 300.0
    as_json = cfg.load(None).model_dump(mode="json")
    assert as_json["limits"]["max_message_size"] == "50MiB"
    assert as_json["upstream"]["timeout"] == "5m"


def test_json_schema_exports() -> None:
    schema = cfg.Config.model_json_schema()
    assert "listeners" in schema["properties"]


def test_dump_round_trip(tmp_path: Path) -> None:
    text = f"""
    hostname: mx.example.com
    domains: [example.com]
    data_dir: data
    shutdown_timeout: 1500ms
    listeners:
      - {{name: mx, port: 25, trusted_proxies: [192.0.2.0/24]}}
      - {{name: in, port: 2600, address: 10.0.0.2, client_cert: required,
          client_ca_file: ca.pem, client_cert_pins: ["{PIN}"], require_tls: true}}
    tls: {{certificates: [{{cert: a.pem, key: a.key}}], min_version: TLSv1.3}}
    upstream: {{hosts: [a.example, b.example], use_tls: true, timeout: 90s}}
    limits: {{max_message_size: 10MB, data_timeout: 2m}}
    state: sqlite:///state/state.db
    state_timeout: 250ms
    rate_limits:
      on_error: tempfail
      timeout: 500ms
      exempt: [10.1.2.3, "2001:db8::/48"]
      ipv4_prefix: 28
      ipv6_prefix: 56
      connections_per_ip: "off"
      connections_per_network: 7/90s
      messages_per_ip: 20/h
      messages_per_network: 0
      concurrent_per_ip: 3
      concurrent_per_network: 0
      slot_ttl: 2h
    greylist:
      on_error: tempfail
      delay: 1m
      retry_window: 1d
      expire: 30d
      min_score: -2.5
      auto_pass_accepted: 0
      auto_pass_tls_sessions: 3
      exempt: []
      ipv4_prefix: 16
      ipv6_prefix: 48
    pass_cache: {{enabled: false, ttl: 30m}}
    tarpit: {{enabled: true, min_score: 2, delay: 1500ms}}
    """
    original = cfg.load(write(tmp_path, text))
    dumped = cfg.dump_effective(original)
    assert "max_message_size: 10MB" in dumped
    assert "shutdown_timeout: 1500ms" in dumped
    assert "timeout: 90s" in dumped
    assert f"state: sqlite:///{tmp_path / 'state' / 'state.db'}" in dumped
    assert "connections_per_network: 7/90s" in dumped
    assert "messages_per_ip: 20/1h" in dumped
    # "off" is written quoted: unquoted, YAML would read it as false.
    assert "connections_per_ip: 'off'" in dumped
    assert "messages_per_network: 'off'" in dumped
    assert "delay: 1500ms" in dumped
    other = tmp_path / "other"
    other.mkdir()
    again = cfg.load(write(other, dumped))
    assert again == original


def test_dump_of_defaults_round_trips(tmp_path: Path) -> None:
    original = cfg.load(None)
    again = cfg.load(write(tmp_path, cfg.dump_effective(original)))
    # data_dir is relative by default; the dump makes it absolute (what the service would use).
    assert again.data_dir == Path("spam-killer-data").absolute()
    assert again.model_copy(update={"data_dir": original.data_dir}) == original


# ---------------------------------------------------------------------------------------------
# check_files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_check_files_accepts_good_files(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("mx.example.test")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "mx.pem")
    leaf.private_key_pem.write_to_path(tmp_path / "mx.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    client = ca.issue_cert("client.example.test")
    client.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    client.private_key_pem.write_to_path(tmp_path / "client.key")
    text = """
    tls: {certificates: [{cert: mx.pem, key: mx.key}]}
    listeners:
      - {name: mx, port: 2525, client_cert: optional, client_ca_file: ca.pem}
    upstream: {ca_file: ca.pem, client_cert: client.pem, client_key: client.key}
    """
    assert cfg.check_files(cfg.load(write(tmp_path, text))) == []


def test_check_files_with_no_certificates_is_fine() -> None:
    assert cfg.check_files(cfg.load(None)) == []


def test_check_files_names_each_bad_file(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("mx.example.test")
    other = ca.issue_cert("other.example.test")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "mx.pem")
    other.private_key_pem.write_to_path(tmp_path / "other.key")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    text = """
    tls:
      certificates:
        - {cert: missing.pem, key: missing.key}
        - {cert: mx.pem, key: other.key}
    listeners:
      - {name: mx, port: 2525, client_cert: required, client_ca_file: garbage.pem}
    upstream: {ca_file: nothere.pem, client_cert: mx.pem, client_key: other.key}
    """
    problems = cfg.check_files(cfg.load(write(tmp_path, text)))
    assert problems == [
        f"tls.certificates.0.cert: {tmp_path / 'missing.pem'}: no such file",
        f"tls.certificates.0.key: {tmp_path / 'missing.key'}: no such file",
        f"tls.certificates.1.key: {tmp_path / 'other.key'} does not match certificate "
        f"{tmp_path / 'mx.pem'}",
        f"listeners.0.client_ca_file: {tmp_path / 'garbage.pem'} holds no PEM certificate",
        f"upstream.ca_file: {tmp_path / 'nothere.pem'}: no such file",
        f"upstream.client_key: {tmp_path / 'other.key'} does not match certificate "
        f"{tmp_path / 'mx.pem'}",
    ]


def test_check_files_finds_two_certificates_of_one_type_for_a_name(
    tmp_path: Path, ca: trustme.CA
) -> None:
    for name in ("a", "b"):
        leaf = ca.issue_cert("mx.example.test", key_type=trustme.KeyType.ECDSA)
        leaf.cert_chain_pems[0].write_to_path(tmp_path / f"{name}.pem")
        leaf.private_key_pem.write_to_path(tmp_path / f"{name}.key")
    text = "tls: {certificates: [{cert: a.pem, key: a.key}, {cert: b.pem, key: b.key}]}\n"
    [problem] = cfg.check_files(cfg.load(write(tmp_path, text)))
    assert problem.startswith(f"tls.certificates.1.cert: {tmp_path / 'b.pem'} is a second ECDSA ")


# ---------------------------------------------------------------------------------------------
# recipients
# ---------------------------------------------------------------------------------------------


def test_recipients_defaults_check_nobody() -> None:
    recipients = cfg.load(None).recipients
    assert recipients.known == {} and recipients.files == []
    assert recipients.delimiter == "+" and recipients.max_unknown == 5


def test_recipients_are_normalised_and_merged(tmp_path: Path) -> None:
    text = """
    domains: [example.com, example.org]
    recipients:
      known:
        Example.COM: [Alice, bob, alice]
        example.com.: [Carol]
        example.org: []
      delimiter: ""
      max_unknown: 0
    """
    recipients = cfg.load(write(tmp_path, text)).recipients
    # Domains differing only in case (or a trailing dot) are one domain: lists merge.
    assert recipients.known == {"example.com": ["alice", "bob", "carol"], "example.org": []}
    assert recipients.delimiter == "" and recipients.max_unknown == 0


def test_recipient_files_merge_into_known(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text(
        "# staff\n\nDave@Example.com\n  erin@example.org   # trailing comment\nx#y@example.com\n"
    )
    text = """
    domains: [example.com, example.org]
    recipients:
      known: {example.com: [alice]}
      files: [users.txt]
    """
    config = cfg.load(write(tmp_path, text))
    assert config.recipients.files == [tmp_path / "users.txt"]  # relative to the config file
    known, problems = cfg.known_recipients(config)
    assert problems == []
    assert known == {
        "example.com": frozenset({"alice", "dave", "x#y"}),
        "example.org": frozenset({"erin"}),
    }
    assert cfg.check_files(config) == []


def test_recipient_file_problems_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text(
        "alice@example.com\nno-at-sign\nbob@elsewhere.example\nal ice@example.com\n"
    )
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "many.txt").write_text("x\n" * 8)
    text = """
    domains: [example.com]
    recipients: {files: [missing.txt, bad.txt, binary.txt, many.txt]}
    """
    config = cfg.load(write(tmp_path, text))  # loading reads none of them
    bad, binary, many = tmp_path / "bad.txt", tmp_path / "binary.txt", tmp_path / "many.txt"
    expected = [
        f"recipients.files.0: {tmp_path / 'missing.txt'}: no such file",
        f"recipients.files.1: {bad} line 2: 'no-at-sign' is not an address (local@domain)",
        f"recipients.files.1: {bad} line 3: elsewhere.example is not one of domains",
        f"recipients.files.1: {bad} line 4: 'al ice' must not contain spaces or control characters",
        f"recipients.files.2: {binary}: not UTF-8 text (byte 0)",
        *(
            f"recipients.files.3: {many} line {n}: 'x' is not an address (local@domain)"
            for n in range(1, 6)
        ),
        f"recipients.files.3: {many}: 3 more bad line(s)",
    ]
    assert cfg.known_recipients(config)[1] == expected
    assert cfg.check_files(config) == expected


# ---------------------------------------------------------------------------------------------
# state, rate limits, greylisting, pass cache, tarpit
# ---------------------------------------------------------------------------------------------


def test_stateful_sections_defaults() -> None:
    config = cfg.load(None)
    assert config.state_timeout == 1.0
    internal = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
    rl = config.rate_limits
    assert (rl.enabled, rl.on_error, rl.timeout) == (True, "accept", 1.0)
    assert rl.exempt == [*internal, "fc00::/7"]
    assert (rl.ipv4_prefix, rl.ipv6_prefix) == (24, 64)
    assert rl.connections_per_ip == Rate(100, 60.0)
    assert rl.connections_per_network == Rate(1000, 60.0)
    assert rl.messages_per_ip == Rate(1000, 3600.0)
    assert rl.messages_per_network == Rate(10_000, 3600.0)
    assert (rl.concurrent_per_ip, rl.concurrent_per_network) == (20, 200)
    assert rl.slot_ttl == 3600.0
    grey = config.greylist
    assert (grey.enabled, grey.on_error, grey.timeout) == (True, "accept", 1.0)
    assert (grey.delay, grey.retry_window, grey.expire) == (300.0, 2 * 86400.0, 35 * 86400.0)
    assert grey.min_score == 0.0
    assert (grey.auto_pass_accepted, grey.auto_pass_tls_sessions) == (5, 0)
    assert grey.exempt == rl.exempt
    assert (grey.ipv4_prefix, grey.ipv6_prefix) == (24, 64)
    assert (config.pass_cache.enabled, config.pass_cache.ttl) == (True, 3600.0)
    tarpit = config.tarpit
    assert (tarpit.enabled, tarpit.min_score, tarpit.delay) == (False, 5.0, 3.0)


def test_rates_in_a_file(tmp_path: Path) -> None:
    text = """
    rate_limits:
      connections_per_ip: 30/1m
      connections_per_network: 20/h
      messages_per_ip: "0"
      messages_per_network: 0
    """
    rl = cfg.load(write(tmp_path, text)).rate_limits
    assert rl.connections_per_ip == Rate(30, 60.0)
    assert rl.connections_per_network == Rate(20, 3600.0)
    assert rl.messages_per_ip is None
    assert rl.messages_per_network is None


@pytest.mark.parametrize("written", ['"off"', "'off'", "'OFF'", "null", "~", "0", "'0'"])
def test_a_rate_can_be_turned_off(tmp_path: Path, written: str) -> None:
    config = cfg.load(write(tmp_path, f"rate_limits: {{connections_per_ip: {written}}}\n"))
    assert config.rate_limits.connections_per_ip is None


def test_a_rate_can_be_turned_off_with_a_bare_off(tmp_path: Path) -> None:
    # The documented word (the error message itself says "or off"), written as admins write
    # it: YAML 1.1 reads a bare off as false, which must mean off here, not an error.
    config = cfg.load(write(tmp_path, "rate_limits: {connections_per_ip: off}\n"))
    assert config.rate_limits.connections_per_ip is None


def test_relative_sqlite_state_resolves_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = cfg.load(write(conf_dir, "state: sqlite:///state.db\n"))
    assert config.state == f"sqlite:///{conf_dir / 'state.db'}"
    assert config.state_url == config.state
    nested = cfg.load(write(conf_dir, "state: sqlite:///var/state.db\n"))
    assert nested.state_url == f"sqlite:///{conf_dir / 'var' / 'state.db'}"
    up = cfg.load(write(conf_dir, "state: sqlite:///../state.db\n"))
    assert up.state_url == f"sqlite:///{conf_dir / '..' / 'state.db'}"


def test_absolute_sqlite_state_stays_absolute(tmp_path: Path) -> None:
    config = cfg.load(write(tmp_path, "state: sqlite:////abs/x.db\n"))
    assert config.state == "sqlite:////abs/x.db"
    assert config.state_url == "sqlite:////abs/x.db"


def test_default_state_is_sqlite_in_data_dir(tmp_path: Path) -> None:
    assert cfg.load(None).state_url == "sqlite:///spam-killer-data/state.db"
    config = cfg.load(write(tmp_path, "data_dir: data\n"))
    assert config.state is None
    assert config.state_url == f"sqlite:///{tmp_path / 'data' / 'state.db'}"
    absolute = cfg.load(write(tmp_path, "data_dir: /var/lib/spam-killer\n"))
    assert absolute.state_url == "sqlite:////var/lib/spam-killer/state.db"


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://redis.internal.example",
        "redis://spamkiller:secret@10.0.0.5:6379/2",
        "rediss://redis.example.com:6380/0",
    ],
)
def test_redis_state_is_kept_as_written(tmp_path: Path, url: str) -> None:
    config = cfg.load(write(tmp_path, f"state: '{url}'\n"))
    assert config.state == config.state_url == url


def test_config_dump_command_output_loads_back(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from spamkiller.cli import cli

    text = """
    data_dir: data
    state: sqlite:///state.db
    state_timeout: 2s
    rate_limits: {connections_per_ip: 5/1s, messages_per_ip: "off", exempt: [192.0.2.0/24]}
    greylist: {delay: 90s, retry_window: 12h, expire: 7d, min_score: -1, ipv6_prefix: 56}
    pass_cache: {ttl: 1d}
    tarpit: {enabled: true, delay: 250ms}
    """
    path = write(tmp_path, text)
    original = cfg.load(path)
    result = CliRunner().invoke(cli, ["config", "dump", "-c", str(path)])
    assert result.exit_code == 0, result.output
    other = tmp_path / "other"
    other.mkdir()
    again = cfg.load(write(other, result.output))
    assert again == original
    assert again.state_url == f"sqlite:///{tmp_path / 'state.db'}"
    assert again.rate_limits.connections_per_ip == Rate(5, 1.0)
    assert again.rate_limits.messages_per_ip is None
    assert again.tarpit.delay == 0.25
