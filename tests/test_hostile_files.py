"""A config file's author as an attacker (issue 11.5): whatever the bytes of host.yaml or
policy.yaml, `socknet check` / `socknet validate` exit 2 with `file:line: reason` lines
and no traceback (or give a verdict), and the running controller refuses the file with
`policy_refused` and keeps its policy. No wall-clock assertions: the limits that keep
every file under 10 s and 1 GiB are asserted as the errors they give; the times and
memory are in `make bench` (bench.hostile, docs/benchmarks.md)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from bench import hostile
from controller import cli
from controller import reload as reload_mod
from controller.reload import PolicyReloader
from controller.runtime import Controller, Stats
from topology.config import parse_host_config
from topology.policy import (
    MAX_RULES,
    AddressSet,
    Policy,
    PolicyError,
    PortRange,
    Rule,
    Service,
    _collapse,
    load_policy,
    parse_policy,
)
from topology.shadowing import first_covering
from topology.yamlpos import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, MAX_PROBLEMS

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
HOST = hostile.HOST_HEAD
GOOD = """\
tiers:
  a: {cidrs: [10.0.1.0/24]}
  b: {cidrs: [10.0.2.0/24], internal: true}
externals:
  tailnet: {cidrs: [100.64.0.0/10]}
policy:
  rules:
    - {name: ab, from: a, to: b, tcp: [80, "8000-8010"]}
    - {name: ping, from: tailnet, to: [a, b], icmp: true}
tests:
  - {from: 10.0.1.5, to: 10.0.2.5, tcp: 80, expect: allow}
"""
# exit 2 prints only these: file:line: reason (or file: cannot read: ...), and a count
PROBLEM = re.compile(r"^socknet: (?P<file>[^:]+)(:(?P<line>\d+))?: .+$")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args))


def refused(result: Any, path: Path, n: int | None = 1) -> list[str]:
    """Exit 2, stderr only `socknet: FILE:LINE: reason` lines (n of them), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    if n is not None:
        assert len(lines) == n, result.stderr
    for line in lines:
        m = PROBLEM.match(line)
        assert (m and m.group("file") == str(path)) or line.startswith("socknet: ... and "), \
            line
    return lines


def check(tmp_path: Path, data: bytes | str, name: str = "policy.yaml") -> tuple[Any, Path]:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return invoke("check", str(path)), path


def validate(tmp_path: Path, data: bytes | str) -> tuple[Any, Path]:
    path = tmp_path / "host.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return invoke("validate", "-c", str(path)), path


# --------------------------------------------------------------------------- the findings


@pytest.mark.parametrize("kind", ["policy", "host"])
@pytest.mark.parametrize("make", [hostile.bracket_bomb, hostile.block_bomb],
                         ids=["brackets", "block-sequences"])
def test_deep_nesting_exits_2_in_a_real_process(make: Any, kind: str, tmp_path: Path):
    """25,000 levels: the process crashed (SIGSEGV, exit 139) in libyaml's composer."""
    path = tmp_path / "deep.yaml"
    path.write_bytes(make(25_000))
    args = ["check", str(path)] if kind == "policy" else ["validate", "-c", str(path)]
    done = subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr == f"socknet: {path}:1: nested deeper than {MAX_DEPTH} levels " \
                          "(the limit)\n"


def test_depth_limit_leaves_real_files_alone(tmp_path: Path):
    nested = "a: " + "{b: " * (MAX_DEPTH - 1) + "1" + "}" * (MAX_DEPTH - 1) + "\n"
    deeper = "a: " + "{b: " * MAX_DEPTH + "1" + "}" * MAX_DEPTH + "\n"
    result, path = check(tmp_path, nested)
    assert "nested deeper" not in result.output  # refused for other reasons
    result, path = check(tmp_path, deeper)
    (line,) = refused(result, path)
    assert "nested deeper than" in line


def test_merge_chain_is_as_deep_as_it_is_long(tmp_path: Path):
    result, path = check(tmp_path, hostile.merge_chain(2_000))
    (line,) = refused(result, path)
    assert f"nested deeper than {MAX_DEPTH}" in line


def test_alias_bomb_counts_what_aliases_stand_for(tmp_path: Path):
    result, path = check(tmp_path, hostile.alias_bomb())
    (line,) = refused(result, path)
    assert f"more than {MAX_NODES} YAML nodes" in line


@pytest.mark.parametrize("kind", ["policy", "host"])
def test_non_utf8_byte_names_its_line(kind: str, tmp_path: Path):
    data = hostile.non_utf8_policy() if kind == "policy" else \
        HOST.encode() + b"host: caf\xe9\n"
    result, path = check(tmp_path, data) if kind == "policy" else validate(tmp_path, data)
    (line,) = refused(result, path)
    expected = 3 if kind == "policy" else 2
    assert line.startswith(f"socknet: {path}:{expected}: not UTF-8 text (byte 0x")


def test_nul_in_host_yaml_policy_path(tmp_path: Path):
    result, path = validate(tmp_path, hostile.nul_host())
    (line,) = refused(result, path)
    assert line == f"socknet: {path}:2: policy: contains the control character U+0000"


def test_nul_and_control_characters_in_policy_names(tmp_path: Path):
    result, path = check(tmp_path, hostile.nul_policy())
    (line,) = refused(result, path)
    assert ":4: tier name 't\\x00' is not a name" in line
    raw_nul, path = check(tmp_path, GOOD.encode() + b"# \x00\n")
    (line,) = refused(raw_nul, path)
    assert line.endswith(":12: character U+0000 is not allowed in YAML")


def test_timestamps_are_strings_not_dates(tmp_path: Path):
    """`host: 2020-13-45` was a YAML timestamp (an invalid one: a traceback)."""
    result, path = validate(tmp_path, hostile.timestamp_host())
    assert result.exit_code == 0, result.output
    assert parse_host_config(hostile.timestamp_host().decode()).host == "2020-13-45"
    result, path = validate(tmp_path, HOST + "controller: {max_backoff_ms: 2020-12-05}\n")
    (line,) = refused(result, path)
    assert "controller.max_backoff_ms: Input should be a valid integer" in line
    result, path = check(tmp_path, hostile.timestamp_policy())
    (line,) = refused(result, path)
    assert ":7: '2020-12-05' is not a port" in line


@pytest.mark.parametrize("text,expected", [
    ("controller: {max_backoff_ms: '2000'}", "Input should be a valid integer"),
    ("metrics: {enabled: yes}", "Input should be a valid boolean"),
    ("host: 1234", "host: Input should be a valid string"),
    ("host: 12:30:00", None),  # base 60 in YAML 1.1: a string here
    ("containers: {'200': {}}", "Input should be a valid integer"),
    ("ovsdb: !!timestamp 2020-01-01", "YAML tag tag:yaml.org,2002:timestamp is not supported"),
    ("host: !!python/object:os.system x", "is not supported"),
    ("controller: {max_backoff_ms: " + "9" * 5000 + "}", "cannot read this value"),
])
def test_scalars_are_not_coerced(text: str, expected: str | None, tmp_path: Path):
    result, path = validate(tmp_path, HOST + text + "\n")
    if expected is None:
        assert result.exit_code == 0, result.output
        return
    (line,) = refused(result, path)
    assert expected in line


def test_oversized_file_is_not_read(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    with path.open("wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: 50 MB of zeros at no cost
    (line,) = refused(invoke("check", str(path)), path)
    assert line == f"socknet: {path}:1: file is larger than {MAX_FILE_BYTES} bytes (the limit)"


def test_fifo_and_devices_are_not_read(tmp_path: Path):
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer: forever
    (line,) = refused(invoke("check", str(fifo)), fifo)
    assert line.endswith(":1: not a regular file")
    (line,) = refused(invoke("check", "/dev/zero"), Path("/dev/zero"))
    assert line.endswith(":1: not a regular file")


@pytest.mark.parametrize("count", [3_000, 12_000])
def test_thousands_of_tiers_validate(count: int, tmp_path: Path):
    """3,000 tiers took 4.8 s, 12,000 over a minute (pairwise overlap check)."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(hostile.many_tiers(count))
    policy = load_policy(path)
    assert len(policy.tiers) == count
    last = count - 1
    assert policy.tier_of(f"{10 + last // 65536}.{last // 256 % 256}.{last % 256}.9") \
        == f"t{last}"
    result = invoke("check", str(path))
    assert result.exit_code == 0 and "1 rules, 2 rule flows" in result.stdout


def test_overlapping_tiers_among_thousands_are_named(tmp_path: Path):
    text = hostile.many_tiers(5_000).decode().replace(
        "  t4999: {cidrs: [10.19.135.0/24]}", "  t4999: {cidrs: [10.0.4.128/25]}")
    result, path = check(tmp_path, text)
    (line,) = refused(result, path)
    assert line.endswith(":5001: tier 't4999' overlaps tier 't4': an address must belong "
                         "to one tier")


def test_same_side_rules_are_not_compared_pairwise(tmp_path: Path):
    text = hostile.same_sides_rules(MAX_RULES - 1).decode()
    assert load_policy_text(text, tmp_path).rules[-1].name == f"r{MAX_RULES - 2}"
    shadowed = text + "    - {name: late, from: a, to: b, tcp: [17]}\n"
    result, path = check(tmp_path, shadowed)
    (line,) = refused(result, path)
    assert line.endswith(f":{MAX_RULES + 5}: rule 'late' can never match: rule 'r16' "
                         "(line 22) already decides every packet it covers")


def load_policy_text(text: str, tmp_path: Path) -> Policy:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_policy(path)


def test_internal_tiers_that_compile_to_millions_of_flows(tmp_path: Path):
    """1,000 scattered internal tiers: a flow per CIDR of `internet` each, 1M flows."""
    result, path = check(tmp_path, hostile.many_tiers(1_000, internal=True, stride=2))
    (line,) = refused(result, path)
    assert "the rules compile to up to 1017004 flows (1017000 of them for the internal " \
           "tiers" in line and line.endswith("at most 101000")


@pytest.mark.parametrize("text,expected", [
    ("tiers: {}\npolicy: {rules: [" + ",".join(["{}"] * 6000) + "]}\n",
     ":2: 6000 rules: at most 5000"),
    ("tiers: {a: {cidrs: [" + ",".join(["1"] * 150_001) + "]}}\n",
     ":1: 150001 addresses, CIDRs and set names in tiers, externals and rules: at most"),
    ("tiers:\n" + "".join(f"  t{k}: {{cidrs: [10.{k // 256}.{k % 256}.0/24], internal: true}}\n"
                          for k in range(4_990)) + "policy: {rules: [" +
     ",".join(["{}"] * 20) + "]}\n", "20 rules and 4990 internal tiers (a rule each): at most"),
    ("tiers: {}\ntests: [" + ",".join(["{}"] * 1001) + "]\n", ":2: 1001 tests: at most 1000"),
    ("tiers: {a: {cidrs: [10.0.0.0/8]}}\npolicy: {rules: [{name: r, from: a, to: a, tcp: ["
     + ",".join(["80"] * 20_001) + "]}]}\n", ":2: 20001 ports and port ranges in rules: at most"),
])
def test_counts_are_refused_before_validation(text: str, expected: str, tmp_path: Path):
    """Each empty rule was three schema errors, each holding memory: counted first."""
    result, path = check(tmp_path, text)
    (line,) = refused(result, path)
    assert expected in line


def test_many_problems_are_counted_not_listed(tmp_path: Path):
    text = "tiers: {a: {cidrs: [" + ",".join(["1"] * 1000) + "]}}\n"
    result, path = check(tmp_path, text)
    lines = refused(result, path, n=MAX_PROBLEMS + 1)
    assert lines[-1] == f"socknet: ... and {1000 - MAX_PROBLEMS} more errors"


def test_anchored_reversed_range_is_reported_once(tmp_path: Path):
    """Issue 13.12: two rules using one anchored port list gave the same line twice."""
    text = """\
tiers:
  a: {cidrs: [10.0.1.0/24]}
  b: {cidrs: [10.0.2.0/24]}
policy:
  rules:
    - {name: one, from: a, to: b, tcp: &ports ["9010-9000"]}
    - {name: two, from: b, to: a, tcp: *ports}
"""
    result, path = check(tmp_path, text)
    (line,) = refused(result, path)
    assert line == f"socknet: {path}:6: port range '9010-9000' is reversed"


# --------------------------------------------------------------------------- issue 13


def test_check_takes_several_files_and_exits_with_the_worst(tmp_path: Path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(GOOD.replace("expect: allow", "expect: deny"))
    both = invoke("check", str(good), str(bad), "-q")
    assert both.exit_code == 1
    assert f"{good}: 3 rules" in both.stdout and f"{bad}: 3 rules" in both.stdout
    result = invoke("check", str(good), str(EXAMPLES / "host.yaml"), str(bad))
    assert result.exit_code == 2 and f"{good}: 3 rules" in result.stdout
    assert f"{bad}: 3 rules" in result.stdout  # files after a bad one are still checked
    assert result.stderr == (f"socknet: {EXAMPLES / 'host.yaml'}:1: this looks like a "
                             f"host.yaml: use socknet validate -c {EXAMPLES / 'host.yaml'}\n")


def test_validate_on_a_policy_says_so(tmp_path: Path):
    result, path = validate(tmp_path, GOOD)
    (line,) = refused(result, path)
    assert line.endswith(f":1: this looks like a policy.yaml: use socknet check {path}")


@pytest.mark.parametrize("field,first,second,shown", [
    ("mac", '"02:00:00:00:02:00"', '"02:00:00:00:02:00"', "02:00:00:00:02:00"),
    ("mac", '"02:00:00:00:02:0A"', '"02:00:00:00:02:0a"', "02:00:00:00:02:0a"),
    ("ip", "10.0.0.5/24", "10.0.0.5/16", "10.0.0.5"),
])
def test_duplicate_container_addresses_are_refused(field: str, first: str, second: str,
                                                   shown: str, tmp_path: Path):
    """Issue 13.3: two table-40 flows with one match and different outputs."""
    what = "MAC" if field == "mac" else "IPv4 address"
    text = (HOST + "containers:\n"
            f"  200: {{{field}: {first}}}\n"
            "  201: {mac: \"02:00:00:00:02:01\"}\n"
            f"  202: {{{field}: {second}}}\n")
    result, path = validate(tmp_path, text)
    (line,) = refused(result, path)
    assert line == (f"socknet: {path}:5: containers.202.{field}: {shown} is also the {what} "
                    f"of container 200 ({path}:3)")
    assert validate(tmp_path, text.replace("202:", "#"))[0].exit_code == 0


# --------------------------------------------------------------------------- hot reload


class FakeController:
    """What PolicyReloader uses of a Controller (as in test_reload)."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.policy: Policy | None = None

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.stats.policy_generation += 1


HOSTILE_POLICIES = {
    "brackets": hostile.bracket_bomb(25_000),
    "block sequences": hostile.block_bomb(25_000),
    "alias bomb": hostile.alias_bomb(),
    "non-UTF-8": hostile.non_utf8_policy(),
    "NUL": hostile.nul_policy(),
    "timestamp port": hostile.timestamp_policy(),
    "host.yaml": (EXAMPLES / "host.yaml").read_bytes(),
    "internal tiers, 1M flows": hostile.many_tiers(1_000, internal=True, stride=2),
}


@pytest.mark.parametrize("name", list(HOSTILE_POLICIES))
def test_hot_reload_of_a_hostile_file_keeps_the_running_policy(name: str, tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    fake = FakeController()
    reloader = PolicyReloader(path, cast(Controller, fake))
    assert reloader.reload("start")
    running = fake.policy
    path.write_bytes(HOSTILE_POLICIES[name])
    with capture_logs() as logs:
        assert not reloader.reload("file moved")
    assert fake.policy is running and fake.stats.policy_generation == 1
    (event,) = [e for e in logs if e["event"] == "policy_refused"]
    assert event["kept_generation"] == 1 and event["problems"]
    assert str(path) in event["problems"][0]
    with path.open("wb") as f:
        f.truncate(50 * 1024 * 1024)
    assert not reloader.reload("file moved") and fake.policy is running


def test_hot_reload_survives_a_crash_while_checking(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """A file that gets past the checks and breaks something later is refused too."""
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    fake = FakeController()
    reloader = PolicyReloader(path, cast(Controller, fake))
    assert reloader.reload("start")
    running = fake.policy

    def broken(_path: Any) -> Policy:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(reload_mod, "load_policy", broken)
    with capture_logs() as logs:
        assert not reloader.reload("SIGHUP")
    assert fake.policy is running
    events = [e["event"] for e in logs]
    assert events == ["policy_check_crashed", "policy_refused"]
    assert "RecursionError" in logs[-1]["problems"][0]


# --------------------------------------------------------------------------- fuzz


SEED_POLICIES = [GOOD.encode(), *(p.read_bytes() for p in sorted(EXAMPLES.glob("*.yaml"))
                                  if p.name != "host.yaml")]
SEED_HOSTS = [(EXAMPLES / "host.yaml").read_bytes(), (HOST + "containers:\n  200: {mac: "
              "\"02:00:00:00:02:00\", ip: 10.0.0.5/24}\n").encode()]
TOKENS = [b"[", b"]", b"{", b"}", b"&a ", b"*a", b"<<: *a", b"!!timestamp ", b"2020-13-45",
          b"\x00", b"\xff", b"\xc3", b"\t", b"- ", b"? ", b": ", b"'", b'"', b"\\0", b"0b_",
          b"1e999", b"~", b"#", b"\n", b"    ", b"%YAML 1.1\n", b"---\n", b"...\n", b"|",
          b">", b"!!python/object:os.system ", b"9" * 5000, b"::", b"/33", b"65536", b"-1",
          b"true", b"yes", b"null", b".inf", b"0x10", b"1:30", b"\xef\xbb\xbf", b"\r",
          b"\xe2\x80\xa8", b"internal: true", b"policy: ../../../../dev/zero", b"!", b"&"]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["byte", "token", "delete", "repeat"]))
        if op == "byte" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "token":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 40))]
        else:
            chunk = bytes(data[pos:pos + draw(st.integers(1, 80))])
            data[pos:pos] = chunk * draw(st.integers(1, 20))
    return bytes(data)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True), st.text(max_size=20),
                    st.dates().map(str), st.sampled_from(["10.0.0.0/8", "0.0.0.0/0", "a", "any",
                                                          "internet", "80", "1-65535"]))
TREES = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)


@st.composite
def retyped(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with one value somewhere replaced by a random YAML value."""
    data = yaml.safe_load(draw(st.sampled_from(seeds)))
    node = data
    for _ in range(draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if draw(st.booleans()) or not isinstance(node[key], dict | list):
                node[key] = draw(TREES)
                break
            node = node[key]
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
            if draw(st.booleans()) or not isinstance(node[k], dict | list):
                node[k] = draw(TREES)
                break
            node = node[k]
    return yaml.safe_dump(data, allow_unicode=draw(st.booleans())).encode()


def assert_clean(result: Any, path: Path) -> None:
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        refused(result, path, n=None)


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.one_of(mutated(SEED_POLICIES), retyped(SEED_POLICIES)))
def test_fuzz_policy_files(data: bytes, tmp_path: Path):
    result, path = check(tmp_path, data)
    assert_clean(result, path)


@FUZZ
@given(data=st.one_of(mutated(SEED_HOSTS), retyped(SEED_HOSTS)))
def test_fuzz_host_files(data: bytes, tmp_path: Path):
    (tmp_path / "pmoves-tiers.yaml").write_bytes((EXAMPLES / "pmoves-tiers.yaml").read_bytes())
    result, path = validate(tmp_path, data)
    assert_clean(result, path)


# --------------------------------------------------------------------------- equivalences


def _nets(draw: st.DrawFn, size: int) -> tuple[IPv4Network, ...]:
    out = []
    for _ in range(draw(st.integers(1, size))):
        plen = draw(st.sampled_from([0, 8, 16, 24, 25, 26, 31, 32]))
        addr = draw(st.sampled_from([0x0A000000, 0x0A000080, 0x0A0000C0, 0x0A010000,
                                     0x0B000000, 0xC0A80001]))
        out.append(IPv4Network((addr, plen), strict=False))
    return tuple(collapse_addresses(out))


@st.composite
def rules(draw: st.DrawFn) -> list[Rule]:
    out = []
    for k in range(draw(st.integers(1, 25))):
        services: list[Service] = []
        for proto in draw(st.lists(st.sampled_from(["tcp", "udp", "icmp"]), unique=True,
                                   max_size=2)):
            ports: tuple[PortRange, ...] = ()
            if proto != "icmp" and draw(st.booleans()):
                lows = draw(st.lists(st.sampled_from([1, 80, 81, 443, 1000]), min_size=1,
                                     max_size=3, unique=True))
                ports = tuple(sorted((PortRange(lo, lo + draw(st.sampled_from([0, 1, 500])))
                                      for lo in lows), key=lambda r: (r.lo, r.hi)))
            services.append(Service(proto, ports))  # type: ignore[arg-type]
        implicit = k < 3 and draw(st.booleans())
        out.append(Rule(k, f"r{k}", AddressSet((f"s{k}",), _nets(draw, 3)),
                        AddressSet((f"d{k}",), _nets(draw, 3)), tuple(services),
                        "allow", False, k + 1, implicit=implicit))
    out.sort(key=lambda r: not r.implicit)  # implicit rules come first, as in a Policy
    return out


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(rules=rules())
def test_shadowing_index_finds_what_comparing_every_pair_finds(rules: list[Rule]):
    expected: list[Rule | None] = []
    for j, later in enumerate(rules):
        found = None
        if not later.implicit:
            found = next((e for e in rules[:j] if e.covers(later)), None)
        expected.append(found)
    assert first_covering(rules) == expected


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(nets=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=30))
def test_collapse_is_ipaddress_collapse(nets: list[tuple[int, int]]):
    networks = [IPv4Network(n, strict=False) for n in nets]
    assert _collapse(networks) == list(collapse_addresses(networks))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(tiers=st.lists(st.lists(st.tuples(st.sampled_from([0x0A000000, 0x0A000100, 0x0A008000,
                                                          0x0B000000]),
                                         st.sampled_from([8, 16, 17, 24, 32])),
                               min_size=1, max_size=3), min_size=1, max_size=8))
def test_overlap_check_names_every_overlapping_pair(tiers: list[list[tuple[int, int]]]):
    sets = [list(collapse_addresses(IPv4Network(n, strict=False) for n in t)) for t in tiers]
    text = "tiers:\n" + "".join(f"  t{k}: {{cidrs: [{', '.join(map(str, nets))}]}}\n"
                                for k, nets in enumerate(sets))
    expected = [f"<string>:{b + 2}: tier 't{b}' overlaps tier 't{a}': an address must belong "
                "to one tier"
                for a in range(len(sets)) for b in range(a + 1, len(sets))
                if any(x.overlaps(y) for x in sets[a] for y in sets[b])]
    try:
        parse_policy(text)
        problems: list[str] = []
    except PolicyError as exc:
        problems = exc.problems
    assert problems == expected[:MAX_PROBLEMS + 1]


def test_address_set_covers_with_bisect():
    big = AddressSet(("x",), tuple(IPv4Network(f"10.0.{k}.0/24") for k in range(0, 200, 2)))
    inside = AddressSet(("y",), (IPv4Network("10.0.4.128/25"), IPv4Network("10.0.198.0/24")))
    across = AddressSet(("z",), (IPv4Network("10.0.4.0/23"),))
    assert big.covers(inside) and not big.covers(across)
    assert big.covers(AddressSet(("e",), ())) and not AddressSet(("e",), ()).covers(inside)
    assert IPv4Address("10.0.198.7") in big


@functools.lru_cache(maxsize=1)
def _example_rules() -> tuple[Any, ...]:
    from topology.check import PolicySimulator
    from topology.simulate import compile_flow

    sim = PolicySimulator(load_policy(EXAMPLES / "pmoves-tiers.yaml"))
    return tuple(compile_flow(f) for f in sim.flows)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_simulator_tuple_space_finds_what_testing_every_flow_finds(data: st.DataObject):
    """The simulator's lookups (a policy's tests on 100k flows) go through a tuple space
    instead of testing every flow: the same flows, in the same order."""
    from topology.simulate import _Table

    rules = _example_rules()
    table = data.draw(st.sampled_from(sorted({r.flow.table for r in rules})))
    mine = [r for r in rules if r.flow.table == table]
    values: dict[str, set[int]] = {}
    for r in mine:
        for name, value, _ in r.match:
            values.setdefault(name, set()).update({value, value | 1, 0})
    fields = {name: data.draw(st.sampled_from(sorted(vs))) for name, vs in values.items()
              if data.draw(st.booleans())}
    expected = sorted((r for r in mine if r.matches(fields)), key=lambda r: r.order)
    assert _Table(mine).matching(fields) == expected

