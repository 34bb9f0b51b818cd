"""What the URIs of remote stores mean, and that their passwords are never shown."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import snaptree
from snaptree import uris


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u:p%40ss@h:5433/db?keep_history=false",
            "postgresql://u:***@h:5433/db?keep_history=false",
        ),
        ("zeo://h:8100?password=pw&wait_timeout=3", "zeo://h:8100?password=***&wait_timeout=3"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("data/snaptree.fs", "data/snaptree.fs"),
    ],
)
def test_redact_masks_passwords_in_the_user_part_and_the_query(uri: str, shown: str) -> None:
    """Passwords are masked wherever a URI can carry one; nothing else changes."""
    assert uris.redact(uri) == shown


def test_scrub_removes_a_password_quoted_in_a_message_even_percent_decoded() -> None:
    """Libraries quote what they were given, sometimes decoded: both forms are removed."""
    uri = "postgresql://u:p%40ss@h/db"
    assert uris.scrub("auth failed for p@ss and p%40ss", uri) == "auth failed for *** and ***"


@pytest.mark.slow
def test_unreachable_zeo_server_fails_within_the_wait_timeout(closed_port: int) -> None:
    """Nobody listening: OpenError naming the address and what to do, after ?wait_timeout."""
    with pytest.raises(snaptree.OpenError) as failure:
        snaptree.open(f"zeo://127.0.0.1:{closed_port}?wait_timeout=1")
    message = str(failure.value)
    assert f"no ZEO server answered at 127.0.0.1:{closed_port} within 1 s" in message
    assert "snaptree serve" in message


@pytest.mark.parametrize(("query", "waits"), [("", 10), ("?wait_timeout=2", 2)])
def test_a_zeo_client_waits_ten_seconds_for_its_server_unless_the_uri_says(
    query: str, waits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZEO's own default is 30 s; snaptree's ClientStorage is told 10, or the URI's value."""
    import ZEO.ClientStorage

    told: dict[str, object] = {}

    def capture(address: object, **options: object) -> None:
        told.update(options, address=address)
        raise RuntimeError("stop here")

    resolved = uris.resolve(f"zeo://127.0.0.1:1{query}")
    monkeypatch.setattr(ZEO.ClientStorage, "ClientStorage", capture)  # imported when opened
    with pytest.raises(RuntimeError, match="stop here"):
        resolved.factory()
    assert told["wait_timeout"] == waits and told["address"] == ("127.0.0.1", 1)


@pytest.mark.parametrize("seconds", ["0", "-3"])
def test_a_zeo_wait_timeout_under_one_second_is_refused(seconds: str) -> None:
    """ZEO reads wait_timeout=0 as its default of 30 s: refused, not a 30 s wait."""
    with pytest.raises(snaptree.OpenError, match=f"wait_timeout must be at least 1.*{seconds}"):
        uris.resolve(f"zeo://127.0.0.1:1?wait_timeout={seconds}")


def test_unknown_zeo_option_is_an_open_error_naming_it() -> None:
    """A misspelt option is refused before any connection, with the valid ones listed."""
    with pytest.raises(snaptree.OpenError, match="unknown option 'wait_timout'"):
        uris.resolve("zeo://127.0.0.1:1?wait_timout=3")


@pytest.mark.slow
def test_zeo_password_option_is_masked_in_errors_and_logs(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """ZEO ignores password=, but a URI carrying one must still never show it."""
    caplog.set_level("DEBUG")
    secret = "zeo-canary-pw"
    with pytest.raises(snaptree.OpenError) as failure:
        snaptree.open(f"zeo://127.0.0.1:{closed_port}?password={secret}&wait_timeout=1")
    assert secret not in str(failure.value)
    assert secret not in caplog.text
    assert "password=***" in str(failure.value)


def test_unreachable_postgresql_is_an_open_error_without_the_password(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Connection refused: OpenError with the URI masked; the password appears nowhere."""
    caplog.set_level("DEBUG")
    secret = "pg-canary-pw"
    with pytest.raises(snaptree.OpenError) as failure:
        snaptree.open(f"postgresql://someone:{secret}@127.0.0.1:{closed_port}/db?connect_timeout=2")
    assert f"postgresql://someone:***@127.0.0.1:{closed_port}/db" in str(failure.value)
    assert secret not in str(failure.value) and secret not in caplog.text


def test_unknown_postgresql_option_is_an_open_error_naming_it() -> None:
    """Options are checked before any connection; the message lists the kinds accepted."""
    with pytest.raises(snaptree.OpenError, match=r"unknown option 'keep_hist'.*keep_history"):
        uris.resolve("postgresql://u:pw@127.0.0.1/db?keep_hist=false")


def test_postgresql_dsn_has_only_the_parts_the_uri_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """No port, no password: libpq's defaults (and ~/.pgpass) apply, not the string 'None'."""
    import relstorage.adapters.postgresql as adapters

    seen: dict[str, str] = {}

    class Capture(adapters.PostgreSQLAdapter):
        def __init__(self, dsn: str = "", options: object = None, **kw: object) -> None:
            seen["dsn"] = dsn
            raise RuntimeError("stop here")

    resolved = uris.resolve("postgresql://reader@db.example/app?sslmode=require")
    monkeypatch.setattr(adapters, "PostgreSQLAdapter", Capture)  # imported when the store opens
    with pytest.raises(RuntimeError, match="stop here"):
        resolved.factory()
    parts = dict(item.split("=", 1) for item in seen["dsn"].split())
    assert parts == {
        "dbname": "app",
        "user": "reader",
        "host": "db.example",
        "sslmode": "require",
        "connect_timeout": "10",
    }


PASSWORD_SHAPES = [
    # (uri, the secret, what the display keeps)
    ("postgresql://app:se#cret9@127.0.0.1:1/db", "se#cret9", "postgresql://***@127.0.0.1:1/db"),
    ("postgresql://app:pa/ss@127.0.0.1:1/db", "pa/ss", "postgresql://***@127.0.0.1:1/db"),
    ("postgresql://app:pa?ss@127.0.0.1:1/db", "pa?ss", "postgresql://***@127.0.0.1:1/db"),
    ("postgresql://app:pa@ss@127.0.0.1:1/db", "pa@ss", "postgresql://app:***@127.0.0.1:1/db"),
    ("postgresql://app:p@s/s#w@127.0.0.1:1/db", "p@s/s#w", "postgresql://***@127.0.0.1:1/db"),
    ("postgresql://app:12#34@127.0.0.1/db", "12#34", "postgresql://***@127.0.0.1/db"),
    ("postgresql://app:[pw]@127.0.0.1:1/db", "[pw]", "postgresql://***@127.0.0.1:1/db"),
    ("postgresql://app:p%23w%2F@127.0.0.1:1/db", "p%23w%2F", "postgresql://app:***@127.0.0.1:1/db"),
    ("zeo://app:se#cret9@127.0.0.1:1", "se#cret9", "zeo://***@127.0.0.1:1"),
    ("zeo://app:pa/ss@127.0.0.1:1?wait_timeout=1", "pa/ss", "zeo://***@127.0.0.1:1?wait_timeout=1"),
    ("zeo://127.0.0.1:1?password=se#cret9", "se#cret9", "zeo://127.0.0.1:1?password=***#***"),
    ("zeo://127.0.0.1:1?password=p%26w&wait_timeout=1", "p%26w", None),
]


@pytest.mark.parametrize(("uri", "secret", "shown"), PASSWORD_SHAPES)
def test_a_password_of_any_shape_is_masked(uri: str, secret: str, shown: str | None) -> None:
    """Unencoded #, /, ?, @ or [ split the URI in odd places: no piece of the secret shows."""
    display = uris.redact(uri)
    if shown is not None:
        assert display == shown
    for piece in {secret, *secret.replace("%", "#").split("#"), *secret.split("/")}:
        if len(piece) >= 3:
            assert piece not in display
    message = uris.scrub(f"could not connect with {uri} ({secret})", uri)
    assert secret not in message


@pytest.mark.parametrize(("uri", "secret", "shown"), PASSWORD_SHAPES)
def test_opening_a_uri_with_any_password_shape_never_shows_it(
    uri: str, secret: str, shown: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenError (never a parser's own message quoting a piece of the password)."""
    caplog.set_level("DEBUG")
    uri = (
        uri
        if "wait_timeout" in uri or "postgres" in uri
        else uri + ("&wait_timeout=1" if "?" in uri else "?wait_timeout=1")
    )
    with pytest.raises(snaptree.OpenError) as failure:
        snaptree.open(uri.replace("127.0.0.1/", "127.0.0.1:1/") + "")
    message = str(failure.value)
    for piece in {secret, *[p for p in secret.replace("%", "#").replace("/", "#").split("#")]}:
        if len(piece) >= 3:
            assert piece not in message and piece not in caplog.text, message
    assert message.startswith("cannot open ") or message.startswith("no ZEO server")


def test_a_misplaced_at_is_named_with_how_to_encode_it() -> None:
    """The refusal says what to do: percent-encode the reserved character."""
    with pytest.raises(snaptree.OpenError, match=r"percent-encode it \(@ as %40, # as %23"):
        uris.resolve("postgresql://app:se#cret9@127.0.0.1:1/db")


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("mysql://u:pw@127.0.0.1/db", "unsupported"),
        ("sqlite:///tmp/x.db", "unsupported"),
        ("oracle://u:pw@h/db", "unsupported"),
        ("redis://h/0", "unknown"),
    ],
)
def test_schemes_snaptree_does_not_open_are_one_clear_error(uri: str, kind: str) -> None:
    """zodburi knows mysql:// and sqlite:// (RelStorage) but snaptree supports neither."""
    with pytest.raises(snaptree.OpenError) as failure:
        snaptree.open(uri)
    message = str(failure.value)
    assert f"{kind} URI scheme" in message
    assert "file://, memory://, zeo://host:port, postgresql://user@host/db or zconfig://" in message
    assert "pw" not in message and "\n" not in message
    assert message.startswith(f"cannot open {uri.split(':')[0]}:")


def test_paths_with_at_signs_are_not_taken_for_passwords(tmp_path: Path) -> None:
    """A file path may hold '@' (user@host directories): it is a path, shown as it is."""
    folder = tmp_path / "me@host"
    folder.mkdir()
    with snaptree.open(str(folder / "Data.fs")) as store:
        assert store.source == str(folder / "Data.fs")
    assert uris.redact(f"file://{folder}/Data.fs") == f"file://{folder}/Data.fs"
    assert uris.redact("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"


def test_a_file_uri_names_the_file_percent_decoded_and_a_path_names_it_as_written(
    tmp_path: Path,
) -> None:
    """Path.as_uri() writes a space as %20; a plain path holding '%20' is that very name."""
    spaced = tmp_path / "my store.fs"
    with snaptree.open(str(spaced)) as store:
        store.run(lambda root: root.__setitem__("k", 1))
    with snaptree.open(spaced.as_uri()) as store:
        assert store.run(lambda root: root["k"]) == 1
    literal = tmp_path / "a%20b.fs"
    with snaptree.open(str(literal)) as store:
        store.run(lambda root: root.__setitem__("k", 2))
    with snaptree.open(literal.as_uri()) as store:  # the % itself encoded as %25
        assert store.run(lambda root: root["k"]) == 2
    assert sorted(p.name for p in tmp_path.glob("*.fs")) == ["a%20b.fs", "my store.fs"]


def test_create_in_a_file_uri_is_refused_and_the_store_kept(tmp_path: Path) -> None:
    """ZODB's create=1 empties an existing file: refused, whatever the file holds."""
    data = tmp_path / "Data.fs"
    with snaptree.open(str(data)) as store:
        store.run(lambda root: root.__setitem__("k", 1))
    size = data.stat().st_size
    with pytest.raises(snaptree.OpenError, match=r"create=1 empties the file .* leave the option"):
        snaptree.open(f"file://{data}?create=1")
    assert data.stat().st_size == size
    with snaptree.open(f"file://{data}?create=0") as store:
        assert store.run(lambda root: root["k"]) == 1
