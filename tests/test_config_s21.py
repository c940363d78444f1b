"""Configuration and command-line defects of an operator's review (s21).

- A misspelt ``KVMEMO_*`` variable was ignored (the operator believed a limit
  was set); it is now refused at start, naming the closest setting.
- A config-file key was accepted under any table; each setting now belongs
  to one table, as the README documents.
- A token with a comma (``--auth-token 'p,ss'``) became two tokens, one of
  them a valid prefix of the secret; a flag's or a TOML item's value is now
  one token, and only the environment variable is a comma-separated list.
- ``kvmemo bench`` with a bad ``--url`` printed a traceback.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from test_cli import keep_logging, resolved, run_main  # noqa: F401  (keep_logging: a fixture)

from kvmemo import cli
from kvmemo.config import StoreConfig
from kvmemo.loadgen import run_load
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig
from kvmemo.settings import ENV_ALSO_ACCEPTED, SETTINGS, TOML_TABLES

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 20  # seconds; every test here finishes far sooner


def config(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "kvmemo.toml"
    path.write_text(text)
    return ["--config", str(path)]


# -- 1. unknown KVMEMO_* environment variables ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("KVMEMO_MAXMEMRY", r"^unknown environment variable KVMEMO_MAXMEMRY "),
        ("KVMEMO_MAXMEMRY", r"\(did you mean KVMEMO_MAXMEMORY\?\)$"),
        ("KVMEMO_AUTH_TOKENS", r"\(did you mean KVMEMO_AUTH_TOKEN\?\)$"),
        ("KVMEMO_EVICTION_POLCY", r"\(did you mean KVMEMO_EVICTION_POLICY\?\)$"),
        ("kvmemo_shards", r"^unknown environment variable kvmemo_shards \(did you mean "),
        ("KVMEMO_FROBNICATE", r"^unknown environment variable KVMEMO_FROBNICATE$"),
    ],
)
def test_a_misspelt_environment_variable_is_refused_naming_the_closest_setting(
    name: str, message: str
) -> None:
    # Was: ignored, so the operator believed the memory limit was 1gb.
    with pytest.raises(ValueError, match=message):
        resolved([], {name: "1gb"})


@pytest.mark.usefixtures("keep_logging")
def test_serve_with_a_misspelt_variable_prints_one_error_line_and_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMEMO_MAXMEMRY", "1gb")
    code, out, err = run_main(["serve", "--port", "0", "--no-resp"], capsys)
    assert (code, out) == (2, "")
    assert err == (
        "kvmemo: error: unknown environment variable KVMEMO_MAXMEMRY"
        " (did you mean KVMEMO_MAXMEMORY?)\n"
    )


def test_every_setting_and_the_other_kvmemo_variables_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "kvmemo.toml").write_text("shards = 3\n")
    environ = {
        "KVMEMO_CONFIG": str(tmp_path / "kvmemo.toml"),
        "KVMEMO_URL": "ws://127.0.0.1:7070/ws",
        "KVMEMO_MAXMEMORY": "1gb",
        "NOT_KVMEMO_X": "1",
    }
    r = resolved([], environ)
    assert (r.store.shards, r.store.maxmemory) == (3, 1024**3)
    assert {"KVMEMO_CONFIG", "KVMEMO_URL"} <= ENV_ALSO_ACCEPTED


# A variable name set or read somewhere: in quotes, before "=", or as process.env.NAME.
USED_VARIABLE = re.compile(
    r"""(?:["']|process\.env\.)(KVMEMO_[A-Z0-9_]+)\b|\b(KVMEMO_[A-Z0-9_]+)="""
)
SKIP_DIRS = {".git", "node_modules", "__pycache__", ".ci-venv", ".venv", ".mypy_cache"}


def test_every_kvmemo_variable_the_repository_uses_is_accepted() -> None:
    accepted = {s.env for s in SETTINGS} | ENV_ALSO_ACCEPTED
    used: dict[str, str] = {}
    for path in ROOT.rglob("*"):
        if not path.is_file() or SKIP_DIRS & set(path.relative_to(ROOT).parts):
            continue
        if path == Path(__file__).resolve():  # its misspelt names are meant to be refused
            continue
        if path.suffix not in {".py", ".md", ".js", ".html", ".toml", ".yml", ""}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for match in USED_VARIABLE.finditer(text):
            used.setdefault(match[1] or match[2], str(path.relative_to(ROOT)))
    assert "KVMEMO_URL" in used  # the JavaScript client's test sets it
    assert "KVMEMO_CONFIG" in used
    unknown = {name: where for name, where in used.items() if name not in accepted}
    assert unknown == {}


# -- 2. each config-file key belongs to one table ----------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[persistence]\nmaxmemory = "1gb"\n',
            r"kvmemo\.toml: 'maxmemory' belongs in \[store\] \(or at the top level\), "
            r"not \[persistence\]$",
        ),
        (
            '[store]\ndir = "/tmp/x"\n',
            r"'dir' belongs in \[persistence\] \(or at the top level\), not \[store\]$",
        ),
        (
            "[limits]\nport = 1\n",
            r"'port' belongs in \[server\] \(or at the top level\), not \[limits\]$",
        ),
        (
            "[server]\nresp_max_clients = 3\n",
            r"'resp_max_clients' belongs in \[limits\] \(or at the top level\), not \[server\]$",
        ),
        (
            '[server]\neviction-policy = "lfu"\n',
            r"'eviction-policy' belongs in \[store\] \(or at the top level\), not \[server\]$",
        ),
        (
            "[foo]\nport = 1\n",
            r"kvmemo\.toml: 'port' belongs in \[server\] \(or at the top level\), "
            r"not in the unknown table \[foo\]$",
        ),
        ("[sever]\nbogus = 1\n", r"unknown table \[sever\] \(did you mean \[server\]\?\)$"),
        ("[store]\n[store.deep]\nshards = 1\n", r"unknown table \[store\.deep\]$"),
    ],
)
def test_a_key_under_the_wrong_table_is_refused_saying_where_it_belongs(
    tmp_path: Path, toml: str, message: str
) -> None:
    # Was: accepted under any known table, and [foo] port = 1 named only the table.
    with pytest.raises(ValueError, match=message):
        resolved(config(tmp_path, toml))


def test_every_setting_is_accepted_in_its_own_table_and_at_the_top_level(tmp_path: Path) -> None:
    r = resolved(
        config(
            tmp_path,
            'log_level = "warning"\nmaxmemory = "1MiB"\n'
            '[server]\nport = 7001\nauth_token = ["t"]\n'
            "[store]\nshards = 3\nttl_tick_ms = 50\n"
            "[limits]\nmax_batch = 4\nresp_max_clients = 7\nmax_key_size = 100\n"
            '[persistence]\nappendfsync = "always"\n',
        )
    )
    assert (r.log_level, r.store.maxmemory, r.server.port) == ("warning", 1024**2, 7001)
    assert (r.store.shards, r.store.ttl_tick, r.server.max_batch) == (3, 0.05, 4)
    assert (r.server.resp_limits.max_clients, r.store.max_key_size) == (7, 100)
    assert r.store.appendfsync == "always"
    assert {s.table for s in SETTINGS} == TOML_TABLES


def test_the_readme_says_which_table_each_setting_belongs_to() -> None:
    readme = (ROOT / "README.md").read_text()
    documented: dict[str, str] = {}
    for table, keys in re.findall(r"^- `\[(\w+)\]`: (.+)$", readme, flags=re.MULTILINE):
        for key in re.findall(r"`([a-z_]+)`", keys):
            documented[key] = table
    assert documented == {s.name: s.table for s in SETTINGS}


# -- 3. a token with a comma is one token ------------------------------------------------------


def test_a_flags_token_with_a_comma_is_one_token() -> None:
    # Was: {"p", "ss"}: "p" alone was accepted as a token.
    assert resolved(["--auth-token", "p,ss"]).server.tokens == frozenset({"p,ss"})
    r = resolved(["--auth-token", "a", "--auth-token", "b,c"])
    assert r.server.tokens == frozenset({"a", "b,c"})


def test_a_config_files_token_with_a_comma_is_one_token(tmp_path: Path) -> None:
    assert resolved(config(tmp_path, 'auth_token = "x,y"\n')).server.tokens == frozenset({"x,y"})
    r = resolved(config(tmp_path, 'auth_token = ["a", "b,c"]\n'))
    assert r.server.tokens == frozenset({"a", "b,c"})


def test_the_environment_variable_is_a_comma_separated_list_with_escapes() -> None:
    assert resolved([], {"KVMEMO_AUTH_TOKEN": "x, y"}).server.tokens == frozenset({"x", "y"})
    assert resolved([], {"KVMEMO_AUTH_TOKEN": "p\\,ss"}).server.tokens == frozenset({"p,ss"})
    r = resolved([], {"KVMEMO_AUTH_TOKEN": "a\\\\,b\\c, ,"})
    assert r.server.tokens == frozenset({"a\\", "b\\c"})
    assert resolved([], {"KVMEMO_AUTH_TOKEN": ""}).server.tokens == frozenset()
    r = resolved([], {"KVMEMO_ALLOWED_ORIGIN": "https://a.example, https://b.example"})
    assert r.server.allowed_origins == frozenset({"https://a.example", "https://b.example"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--auth-token", ""], r"^invalid --auth-token: a token must not be empty$"),
        (
            ["--auth-token", " s3cret"],
            r"^invalid --auth-token: a token must not begin or end with whitespace$",
        ),
        (
            ["--allowed-origin", "https://a.example,https://b.example"],
            r"^invalid --allowed-origin: an origin has no comma or whitespace, got "
            r"'https://a\.example,https://b\.example' \(give one origin per value\)$",
        ),
        (["--allowed-origin", ""], r"^invalid --allowed-origin: an origin must not be empty$"),
    ],
)
def test_a_token_or_origin_that_would_change_meaning_is_refused(
    argv: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        resolved(argv)
    assert "s3cret" not in str(caught.value)  # a token is never echoed


# -- 4. kvmemo bench with a bad --url ----------------------------------------------------------


LOAD: dict[str, Any] = dict(
    sessions=2, pipeline=2, batch=1, keys=10, read_ratio=0.5, value_size=4, duration=0.2
)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://127.0.0.1:1/ws",
            "--url must be a ws:// or wss:// URL, got 'http://127.0.0.1:1/ws'",
        ),
        ("garbage", "--url must be a ws:// or wss:// URL, got 'garbage'"),
        ("ws:///ws", "--url has no host, got 'ws:///ws'"),
        ("ws://127.0.0.1:99999/ws", "--url has a bad port, got 'ws://127.0.0.1:99999/ws'"),
        ("ws://127.0.0.1:x/ws", "--url has a bad port, got 'ws://127.0.0.1:x/ws'"),
        ("ws://127.0.0.1:0/ws", "--url has a bad port, got 'ws://127.0.0.1:0/ws'"),
    ],
)
def test_bench_with_a_malformed_url_is_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    # Was: a run whose every session failed (CONNECT errors), or a traceback.
    code, out, err = run_main(["bench", "--url", url, "--no-progress"], capsys)
    assert (code, out, err) == (2, "", f"kvmemo: error: {message}\n")


def test_run_load_refuses_a_malformed_url() -> None:
    with pytest.raises(ValueError, match=r"^url must be a ws:// or wss:// URL, got 'x'$"):
        trio.run(lambda: run_load("x", **LOAD))


def test_bench_against_a_closed_port_is_one_error_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws"
    code, out, err = run_main(["bench", "--url", url, "--no-progress", "--json"], capsys)
    assert (code, out) == (1, "")
    assert err == f"kvmemo: error: cannot connect to {url}: Connection refused\n"


@asynccontextmanager
async def node() -> AsyncIterator[Node]:
    async with open_node(StoreConfig(shards=2), ServerConfig(port=0, resp=False)) as n:
        yield n


@pytest.mark.parametrize(
    ("path", "status"), [("/", "HTTP 200"), ("/nope", "HTTP 404"), ("/healthz", "HTTP 200")]
)
async def test_bench_against_a_page_that_is_not_the_session_url_is_one_error_line(
    capsys: pytest.CaptureFixture[str], path: str, status: str
) -> None:
    # Was: a traceback (the handshake's rejection escaped the session's nursery).
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            url = n.url.removesuffix("/ws") + path
            argv = ["bench", "--url", url, "--no-progress", "--duration", "0.2"]
            code = await trio.to_thread.run_sync(cli.main, argv)
            result = await run_load(url, **LOAD)
    captured = capsys.readouterr()
    assert (code, captured.out) == (1, "")
    assert captured.err == (
        f"kvmemo: error: cannot connect to {url}: the server answered {status}, "
        "not a WebSocket handshake (is the path /ws?)\n"
    )
    assert (result.connected, result.errors) == (0, {"CONNECT": 2})
    assert result.connect_error is not None
    assert result.connect_error.startswith(f"the server answered {status}")


async def test_bench_with_a_wrong_token_names_the_refusal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node(
            StoreConfig(shards=2), ServerConfig(port=0, resp=False, tokens=frozenset({"t"}))
        ) as n:
            argv = ["bench", "--url", n.url, "--token", "wrong", "--no-progress"]
            code = await trio.to_thread.run_sync(cli.main, argv)
    captured = capsys.readouterr()
    assert (code, captured.out) == (1, "")
    assert captured.err.startswith(f"kvmemo: error: cannot connect to {n.url}: NOAUTH")
    assert len(captured.err.splitlines()) == 1
