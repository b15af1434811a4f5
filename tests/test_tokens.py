"""Bearer tokens: ``edgeroute token new``, the hashed token file, header parsing.

The server-side checks over real gRPC are in tests/test_edge_security.py.
"""

from __future__ import annotations

import hashlib

import pytest

from edge_service.auth import (
    TokenFileError,
    TokenStore,
    bearer_token,
    hash_token,
    parse_token_file,
)


def test_token_new_prints_the_token_then_the_file_line(run_cli, tmp_path):
    proc = run_cli("token", "new", "alice", timeout=60)
    assert proc.returncode == 0, proc.stderr
    token, line = proc.stdout.splitlines()
    principal, digest = line.split("\t")
    assert principal == "alice"
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert token not in line  # the file never holds a usable token
    assert len(token) >= 22  # at least 128 bits in URL-safe base64
    # The line it prints is a valid token file that recognises the token.
    path = tmp_path / "tokens.tsv"
    path.write_text(line + "\n")
    assert TokenStore(path).principal_for(token) == "alice"


def test_two_tokens_differ(run_cli):
    a = run_cli("token", "new", "alice", timeout=60).stdout.splitlines()[0]
    b = run_cli("token", "new", "alice", timeout=60).stdout.splitlines()[0]
    assert a != b


@pytest.mark.parametrize("name", ["", "two words", "tab\tname", "x" * 129, "ünïcode"])
def test_token_new_refuses_a_bad_principal(run_cli, name):
    proc = run_cli("token", "new", name, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and "principal" in proc.stderr


def test_token_file_lines_and_errors():
    h = hash_token("secret-a")
    table = parse_token_file(f"# comment\n\nalice\t{h}\nbob\t{hash_token('secret-b')}\n")
    assert table[h] == "alice" and len(table) == 2
    for bad, why in [
        ("alice\n", "expected"),
        ("alice\tnothex\n", "64 hex"),
        ("al ice\t" + h + "\n", "principal"),
        (f"alice\t{h}\nbob\t{h}\n", "twice"),
    ]:
        with pytest.raises(TokenFileError, match=why) as err:
            parse_token_file(bad, "t.tsv")
        assert "secret" not in str(err.value)


def test_a_bad_line_is_reported_without_its_content():
    pasted = "alice s3cr3t-token-pasted-by-mistake"
    with pytest.raises(TokenFileError) as err:
        parse_token_file(pasted + "\n", "t.tsv")
    assert "s3cr3t" not in str(err.value) and "t.tsv:1" in str(err.value)


def test_store_reload_adds_and_removes_principals(tmp_path):
    path = tmp_path / "tokens.tsv"
    path.write_text(f"alice\t{hash_token('ta')}\n")
    store = TokenStore(path)
    assert store.principal_for("ta") == "alice" and store.principal_for("tb") is None
    path.write_text(f"bob\t{hash_token('tb')}\n")
    store.reload()
    assert store.principal_for("ta") is None and store.principal_for("tb") == "bob"
    # A broken file keeps the principals in force.
    path.write_text("garbage\n")
    with pytest.raises(TokenFileError):
        store.reload()
    assert store.principal_for("tb") == "bob"


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ((), None),
        ((("x-other", "1"),), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer abc"),), "abc"),
    ],
)
def test_bearer_header(metadata, expected):
    assert bearer_token(metadata) == expected


@pytest.mark.parametrize(
    "value",
    ["Basic abc", "Bearer", "Bearer ", "Bearer a b", "abc", "Bearer " + "x" * 600],
)
def test_malformed_bearer_header(value):
    with pytest.raises(ValueError):
        bearer_token((("authorization", value),))


def test_two_authorization_headers_are_refused():
    with pytest.raises(ValueError):
        bearer_token((("authorization", "Bearer a"), ("authorization", "Bearer b")))
