"""The image spec parser: a valid spec in full, and every bad input as one line naming the
file, the line and the key (SpecError, exit 2), before anything is built."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vsockrpc.cli.main import exit_status
from vsockrpc.errors import SpecError
from vsockrpc.payload import load_spec, require_spec_name
from vsockrpc.payload._toml_lines import KeyLines

GOOD = """\
name = "demo"
agent = false
memory = 768
cpus = 2
kernel_cmdline = "loglevel=4"
apt = ["tree", "jq"]
pip = ["six==1.17.0"]
pip_requirements = "requirements.txt"

[env]
GREETING = "hello"

[[copy]]
source = "motd.txt"
dest = "/etc/motd"
mode = "0600"

[[copy]]
source = "data"
dest = "/opt/data/"

[[service]]
register = "shop.api:register"
source = "shop"

[[command]]
name = "echo"
argv = ["/usr/local/bin/echo-server", "7000"]
restart = "always"
ready = "vsock:7000"
"""


def _project(tmp_path: Path, text: str = GOOD) -> Path:
    (tmp_path / "motd.txt").write_text("hi\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "api.py").write_text("def register(server):\n    pass\n")
    (tmp_path / "shop" / "__pycache__").mkdir()
    (tmp_path / "shop" / "__pycache__" / "api.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / "requirements.txt").write_text("# extra\nattrs==26.1.0\n\nsix==1.17.0\n")
    spec = tmp_path / "vsockrpc.toml"
    spec.write_text(text)
    return spec


def _error(tmp_path: Path, text: str) -> str:
    spec = _project(tmp_path, textwrap.dedent(text))
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert exit_status(info.value) == 2  # the CLI's usage-error status
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_full_spec_parses_into_its_parts(tmp_path: Path) -> None:
    spec = load_spec(_project(tmp_path))
    assert (spec.name, spec.agent, spec.memory, spec.cpus) == ("demo", False, 768, 2)
    assert spec.kernel_cmdline == "loglevel=4"
    assert spec.apt == ("jq", "tree")
    assert spec.pip == ("six==1.17.0", "attrs==26.1.0")
    assert dict(spec.env) == {"GREETING": "hello"}
    assert [(c.dest, c.mode) for c in spec.copy] == [("/etc/motd", 0o600), ("/opt/data", None)]
    assert spec.copy[0].source == (tmp_path / "motd.txt").resolve()
    assert [s.register for s in spec.services] == ["shop.api:register"]
    assert [f.dest for f in spec.service_sources()] == ["shop/__init__.py", "shop/api.py"]
    command = spec.commands[0]
    assert (command.name, command.argv, command.restart, command.ready) == (
        "echo",
        ("/usr/local/bin/echo-server", "7000"),
        "always",
        "vsock:7000",
    )
    config = spec.guest_config()
    assert json.loads(json.dumps(config)) == {
        "agent": False,
        "env": {"GREETING": "hello"},
        "services": ["shop.api:register"],
        "commands": [
            {
                "name": "echo",
                "argv": ["/usr/local/bin/echo-server", "7000"],
                "restart": "always",
                "ready": "vsock:7000",
            }
        ],
    }


def test_an_empty_spec_is_vsockrpcs_own_guest(tmp_path: Path) -> None:
    spec = load_spec(_project(tmp_path, ""))
    assert spec.agent and not spec.services and not spec.commands and spec.name is None
    with pytest.raises(SpecError, match="has no name"):
        require_spec_name(spec, None)
    assert require_spec_name(spec, "given") == "given"


def test_top_digest_follows_service_code_and_copied_files_only(tmp_path: Path) -> None:
    path = _project(tmp_path)
    first = load_spec(path).top_digest()
    assert load_spec(path).top_digest() == first
    (tmp_path / "shop" / "__pycache__" / "api.cpython-311.pyc").write_bytes(b"y")
    assert load_spec(path).top_digest() == first
    (tmp_path / "shop" / "api.py").write_text("def register(server):\n    return None\n")
    second = load_spec(path).top_digest()
    assert second != first
    (tmp_path / "data" / "a.bin").write_bytes(b"\x02")
    assert load_spec(path).top_digest() not in (first, second)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "x"\nmemroy = 512\n', ":2: memroy: unknown key (expected one of: name,"),
        ('memory = "lots"\n', ':1: memory: expected a positive integer, got a string ("lots")'),
        ("memory = 0\n", ":1: memory: expected a positive integer, got 0"),
        ("cpus = 1.5\n", ":1: cpus: expected a positive integer, got a number (1.5)"),
        ('agent = "no"\n', ":1: agent: expected true or false, got a string"),
        ('apt = "tree"\n', ":1: apt: expected an array of strings, got a string"),
        ('\n\napt = ["tree", 3]\n', ":3: apt: [1]: expected a string, got an integer (3)"),
        ('apt = ["Tree!"]\n', ":1: apt: [0]: 'Tree!' is not a Debian package name"),
        ('name = "Bad Name"\n', ":1: name: 'Bad Name' is not a valid image name"),
        ('kernel_cmdline = "init=/bin/sh"\n', ":1: kernel_cmdline: must be one line and"),
        (
            'name = "x"\nkernel = "mine"\n',
            ":2: kernel: 'mine' is not a kernel (choose from debian, tailored)",
        ),
        ("kernel = 6\n", ":1: kernel: expected a string, got an integer (6)"),
        ('pip = ["six==1", "six==2"]\n', ":1: pip: conflicting pins for six: ==1 and ==2"),
        ('pip = ["-e ."]\n', ":1: pip: '-e .' is not a requirement"),
        ('pip_requirements = "nope.txt"\n', ":1: pip_requirements: cannot read nope.txt"),
        ('pip_find_links = "nowhere"\n', ":1: pip_find_links: no such directory: nowhere"),
        ('[env]\n"1BAD" = "x"\n', ":2: env.1BAD: not a valid environment variable name"),
        ("[env]\nN = 3\n", ":2: env.N: expected a string, got an integer (3)"),
        ('env = "x"\n', ":1: env: expected a table, got a string"),
        ('copy = "x"\n', ":1: copy: expected an array of tables ([[copy]]), got a string"),
        (
            '[[copy]]\nsource = "motd.txt"\ndest = "/etc/motd"\n\n'
            '[[copy]]\nsource = "missing.txt"\ndest = "/x"\n',
            ":6: copy[1].source: no such file or directory: missing.txt",
        ),
        ('[[copy]]\nsource = "motd.txt"\n', ":1: copy[0]: missing key 'dest' (a string)"),
        (
            '[[copy]]\nsource = "motd.txt"\ndest = "etc/motd"\n',
            ":3: copy[0].dest: 'etc/motd' must be an absolute guest path",
        ),
        (
            '[[copy]]\nsource = "motd.txt"\ndest = "/etc/../x"\n',
            ":3: copy[0].dest: '/etc/../x' must be an absolute guest path",
        ),
        (
            '[[copy]]\nsource = "motd.txt"\ndest = "/m"\nmode = "rwx"\n',
            ":4: copy[0].mode: expected an octal mode",
        ),
        (
            '[[copy]]\nsource = "motd.txt"\ndest = "/m"\nowner = "me"\n',
            ":4: copy[0].owner: unknown key (expected one of: source, dest, mode)",
        ),
        (
            '[[service]]\nregister = "shop.api"\nsource = "shop"\n',
            ":2: service[0].register: 'shop.api' is not of the form package.module:function",
        ),
        (
            '[[service]]\nregister = "other.api:register"\nsource = "shop"\n',
            ":2: service[0].register: module other.api is not inside shop",
        ),
        (
            '[[service]]\nregister = "gone.api:register"\nsource = "gone"\n',
            ":3: service[0].source: no such package directory or .py module: gone",
        ),
        (
            '[[command]]\nname = "a"\nargv = ["run"]\n',
            ":3: command[0].argv: must start with the program's absolute guest path",
        ),
        (
            '[[command]]\nname = "a"\nargv = ["/bin/a"]\nrestart = "sometimes"\n',
            ":4: command[0].restart: 'sometimes': expected one of always, on-failure, never",
        ),
        (
            '[[command]]\nname = "a"\nargv = ["/bin/a"]\nready = "port 80"\n',
            ':4: command[0].ready: \'port 80\': expected "vsock:PORT" or "tcp:PORT"',
        ),
        (
            '[[command]]\nname = "a"\nargv = ["/bin/a"]\n[[command]]\nname = "a"\nargv = ["/b"]\n',
            ":5: command[1].name: a command named 'a' is already declared",
        ),
        ('[[command]]\nname = "a"\n', ":1: command[0]: missing key 'argv' (an array of strings)"),
    ],
)
def test_bad_input_is_one_line_naming_file_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = _error(tmp_path, text)
    assert message.startswith(str(tmp_path / "vsockrpc.toml") + ":"), message
    assert expected in message, message


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, 'name = "x"\nmemory = = 3\n')
    assert "invalid TOML" in message and "line 2" in message


def test_a_missing_or_unreadable_spec_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read image spec .*nothing\.toml"):
        load_spec(tmp_path / "nothing.toml")


def test_key_lines_know_tables_arrays_and_dotted_keys() -> None:
    lines = KeyLines(
        'a = 1\ntext = """\nb = 2\n"""\n[t]\nx.y = 2\n[[arr]]\nk = 1\n[[arr]]\nk = 2\n'
    )
    assert lines.line(("a",)) == 1
    assert lines.line(("b",)) is None  # inside a multi-line string
    assert lines.line(("t", "x", "y")) == 6
    assert lines.line(("t", "x", "y", "z")) == 6  # falls back to the longest known prefix
    assert lines.line(("arr", 1, "k")) == 10
    assert lines.line(("arr", 0)) == 7


def test_host_and_guest_agree_on_where_the_guest_config_is() -> None:
    from vsockrpc.guest import userconfig
    from vsockrpc.payload import spec

    assert userconfig.CONFIG_PATH == spec.GUEST_CONFIG_PATH
    assert userconfig.BUNDLE_CONFIG == spec.BUNDLE_CONFIG
