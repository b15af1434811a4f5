"""The device's side of a secure edge (issue 13): TLS, mTLS and bearer tokens
from the client, clear failures that make the device answer the turn, and a
client that checks what the edge sends back.

Real gRPC over loopback, real TLS with certificates made at test time
(tests/_pki.py), real token files.  Fakes only inject faults: the fake model
of tests/_edge_fakes.py where no real answer is needed, a backend that
miscounts, and a minimal servicer whose final message is malformed.
The server's own checks are in tests/test_edge_security.py.
"""

from __future__ import annotations

import math
from concurrent import futures

import grpc
import pytest

from _edge_fakes import FaultBackend, GatedSlot
from _pki import have_openssl, make_pki
from device_runtime.link.credentials import (
    ENV_TOKEN,
    ChannelSecurity,
    CredentialsError,
    EdgeSecuritySettings,
    is_loopback,
)
from device_runtime.link.edge_client import EdgeClient, EdgeError, EdgeUnavailable, GenerationParams
from edge_service.auth import hash_token, new_token
from edge_service.server import EdgeServerThread
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2, edge_pb2_grpc

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not have_openssl():
        pytest.skip("needs the openssl command")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    """(the token of principal device-a, the server's token file)."""
    value = new_token()
    path = tmp_path_factory.mktemp("auth") / "tokens.tsv"
    path.write_text(f"device-a\t{hash_token(value)}\n")
    return value, path


@pytest.fixture(scope="module")
def secure_edge(pki, token):
    """TLS and a token file, with the fake model (the link is what is tested)."""
    settings = EdgeSettings(n_slots=1, tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens=token[1])
    with EdgeServerThread(settings, backend=FaultBackend(gate_open=True)) as server:
        yield server


def _all_calls(client: EdgeClient) -> list:
    """Each RPC the device makes, as a thunk."""
    return [
        lambda: client.open_session(),
        lambda: client.generate("some-session", HI, open_session=True).consume(),
        lambda: client.ping(8),
        lambda: client.server_info(),
        lambda: client.close_session("some-session"),
    ]


# --- TLS and tokens that work ----------------------------------------------------------


def test_tls_and_a_token_reach_the_edge_on_every_call(secure_edge, pki, token):
    security = ChannelSecurity(ca_file=pki.ca_cert, token=token[0])
    assert security.tls  # a CA implies TLS
    assert security.metadata(secure_edge.target) == (("authorization", f"Bearer {token[0]}"),)
    with EdgeClient(secure_edge.target, security=security) as c:
        sid = c.open_session()
        assert c.generate(sid, HI).consume().text == "chunk"
        assert c.ping(16, 16) > 0 and c.server_info().n_slots == 1
        c.close_session(sid)


def test_mtls_with_a_client_certificate_signed_by_the_edge_s_client_ca(pki, tmp_path):
    """mTLS: the certificate is the credential; without one, or with one from
    another CA, the handshake fails and the device falls back (unavailable)."""
    cert, key = pki.client("device-b")
    other = make_pki(tmp_path / "other")
    rogue_cert, rogue_key = other.client("device-b")
    settings = EdgeSettings(n_slots=1, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert)
    with EdgeServerThread(settings, backend=FaultBackend(gate_open=True)) as server:
        good = ChannelSecurity(ca_file=pki.ca_cert, cert_file=cert, key_file=key)
        with EdgeClient(server.target, security=good) as c:
            assert c.generate(c.open_session(), HI).consume().text == "chunk"
        for bad in (ChannelSecurity(ca_file=pki.ca_cert),
                    ChannelSecurity(ca_file=pki.ca_cert, cert_file=rogue_cert, key_file=rogue_key)):
            with EdgeClient(server.target, security=bad, connect_timeout_s=0.5) as c:
                with pytest.raises(EdgeUnavailable, match="client certificate"):
                    c.open_session()


# --- refused credentials and mismatched transports: clear errors, the device answers ---


@pytest.mark.parametrize("presented", [None, "wrong"])
def test_no_or_a_wrong_token_is_an_edge_error_that_names_the_credentials(secure_edge, pki, token, presented):
    wrong = new_token() if presented == "wrong" else None
    with EdgeClient(secure_edge.target, security=ChannelSecurity(ca_file=pki.ca_cert, token=wrong)) as c:
        for call in _all_calls(c):
            with pytest.raises(EdgeError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "the edge refused the credentials" in str(err.value)
            assert wrong is None or wrong not in str(err.value)


def test_a_plaintext_client_on_a_tls_port_is_unavailable_with_a_hint(secure_edge, token):
    # Loopback: a token may go as plain metadata, so only the transport differs.
    with EdgeClient(secure_edge.target, security=ChannelSecurity(token=token[0]), connect_timeout_s=0.5) as c:
        for call in _all_calls(c):
            with pytest.raises(EdgeUnavailable) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "if it serves TLS, give --tls-ca" in str(err.value)


def test_a_tls_client_on_a_plaintext_port_or_against_an_untrusted_certificate(secure_edge, pki, token, tmp_path):
    """A TLS client never talks to an edge it cannot verify: a plaintext edge,
    or one whose certificate another CA signed (an impersonator), or the right
    edge with only the system roots (a private CA is not among them)."""
    impostor_ca = make_pki(tmp_path / "impostor").ca_cert
    with EdgeServerThread(EdgeSettings(n_slots=1), backend=FaultBackend(gate_open=True)) as plain:
        cases = [
            (plain.target, ChannelSecurity(ca_file=pki.ca_cert, token=token[0])),
            (secure_edge.target, ChannelSecurity(ca_file=impostor_ca, token=token[0])),
            (secure_edge.target, ChannelSecurity(tls=True, token=token[0])),
        ]
        for target, security in cases:
            with EdgeClient(target, security=security, connect_timeout_s=0.5) as c:
                with pytest.raises(EdgeUnavailable, match="the TLS handshake failed"):
                    c.generate("s", HI, open_session=True).consume()


# --- the token never travels in clear, and every file is checked up front -------------


def test_a_token_is_never_sent_in_clear_text_to_another_machine(pki):
    token = new_token()
    for target in ("10.0.0.7:50051", "edge.example:50051", "[2001:db8::1]:50051"):
        assert not is_loopback(target)
        with pytest.raises(CredentialsError, match="clear text"):
            EdgeClient(target, security=ChannelSecurity(token=token))
        # Over TLS it may go.
        assert ChannelSecurity(ca_file=pki.ca_cert, token=token).metadata(target)
    for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051"):
        assert is_loopback(target)
        assert ChannelSecurity(token=token).metadata(target)


def test_security_settings_read_and_check_every_file(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    spaced = tmp_path / "spaced.token"
    spaced.write_text("two words\n")
    cert, key = pki.client("device-c")
    bad = [
        (EdgeSecuritySettings(tls_ca=tmp_path / "missing.crt"), "cannot read CA file"),
        (EdgeSecuritySettings(tls_ca=garbage), "no PEM certificate"),
        (EdgeSecuritySettings(tls_cert=cert), "--tls-cert and --tls-key go together"),
        (EdgeSecuritySettings(tls_cert=cert, tls_key=pki.ca_key), "not a PEM certificate and its"),
        (EdgeSecuritySettings(tls_cert=garbage, tls_key=key), "not a PEM certificate and its"),
        (EdgeSecuritySettings(token_file=tmp_path / "missing.token"), "cannot read token file"),
        (EdgeSecuritySettings(token_file=empty), "is empty"),
        (EdgeSecuritySettings(token_file=spaced), "one line of printable characters"),
    ]
    for settings, why in bad:
        with pytest.raises(CredentialsError, match=why):
            settings.channel_security()
    good = tmp_path / "good.token"
    good.write_text("from-the-file\n")
    s = EdgeSecuritySettings(tls_ca=pki.ca_cert, tls_cert=cert, tls_key=key, token_file=good)
    security = s.channel_security(env_token="from-the-environment")
    assert security.tls and security.token == "from-the-file"  # the flag wins over the environment
    assert EdgeSecuritySettings().channel_security("from-the-environment").token == "from-the-environment"
    assert EdgeSecuritySettings().channel_security(None).token is None
    with pytest.raises(CredentialsError, match=ENV_TOKEN):
        EdgeSecuritySettings().channel_security("has a space")


# --- a malformed final message is an EdgeError, never a crash --------------------------


class FixedDone(edge_pb2_grpc.EdgeLLMServicer):
    """Fault injection: every Generate streams one chunk, then this final message."""

    def __init__(self, done: edge_pb2.GenerateDone) -> None:
        self.done = done

    def OpenSession(self, request, context):
        return edge_pb2.OpenSessionResponse(session_id=request.session_id or "s")

    def Generate(self, request, context):
        yield edge_pb2.GenerateResponse(chunk=edge_pb2.TokenChunk(text="Hi"))
        yield edge_pb2.GenerateResponse(done=self.done)


def _done(prompt=3, prefill=2, cached=1, output=1, prefill_s=0.001, decode_s=0.001, ttft_s=0.001, queue_s=0.0):
    return edge_pb2.GenerateDone(
        usage=edge_pb2.Usage(prompt_tokens=prompt, prefill_tokens=prefill, cached_tokens=cached,
                             output_tokens=output),
        timings=edge_pb2.ServerTimings(prefill_s=prefill_s, decode_s=decode_s, ttft_s=ttft_s, queue_s=queue_s),
        finish_reason=edge_pb2.FINISH_REASON_STOP,
    )


def _serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    edge_pb2_grpc.add_EdgeLLMServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


MALFORMED = {
    "nan timing": _done(prefill_s=math.nan),
    "negative timing": _done(decode_s=-0.5),
    "infinite timing": _done(ttft_s=math.inf),
    "counts that do not add up": _done(prompt=10, prefill=3, cached=3),
    "absurd count": _done(prompt=2**32 - 1, prefill=2**32 - 1, cached=0),
    "more output than asked": _done(output=100),
    "more work than the call took": _done(prefill_s=1e6),
}


@pytest.mark.parametrize("fault", sorted(MALFORMED))
def test_a_malformed_final_message_is_an_edge_error(fault):
    server, target = _serve(FixedDone(MALFORMED[fault]))
    try:
        with EdgeClient(target) as c:
            with pytest.raises(EdgeError) as err:
                c.generate("s", HI, GenerationParams(max_tokens=4), open_session=True).consume()
            assert err.value.code == grpc.StatusCode.INTERNAL
            assert "malformed final message" in str(err.value)
    finally:
        server.stop(0)


def test_a_well_formed_final_message_passes_the_checks():
    server, target = _serve(FixedDone(_done()))
    try:
        with EdgeClient(target) as c:
            r = c.generate("s", HI, GenerationParams(max_tokens=4), open_session=True).consume()
            assert (r.text, r.prompt_tokens, r.prefill_tokens, r.cached_tokens) == ("Hi", 3, 2, 1)
    finally:
        server.stop(0)


class MiscountingBackend(FaultBackend):
    """Fault injection on the real server: the ``bad`` answers (1-based) report
    more prefilled tokens than the prompt holds; the others are well formed."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__(gate_open=True)
        self.bad = bad
        self.answers = 0

    def new_slot(self):
        return MiscountingSlot(self)


class MiscountingSlot(GatedSlot):
    def stream(self, messages, params, cancel, *args, **kwargs):
        yield from super().stream(messages, params, cancel, *args, **kwargs)
        self.backend.answers += 1
        if self.backend.answers in self.backend.bad and self.last_stats is not None:
            self.last_stats.prefill_tokens = self.last_stats.prompt_tokens + 7


@pytest.mark.slow
def test_a_malformed_final_message_falls_back_with_the_transcript_intact(slm):
    """The edge recorded turn 3 but its final message was malformed: the device
    answers it, and the edge drops its own answer on the next call (the count
    and digest of what the device holds), so both sides hold one conversation
    with each prompt once."""
    from device_runtime.link.profile import live_cost_params
    from device_runtime.routing.policies import FixedPolicy
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings

    with EdgeServerThread(EdgeSettings(n_slots=1), backend=MiscountingBackend({3})) as server, \
            EdgeClient(server.target) as edge:
        orch = Orchestrator(slm, FixedPolicy("edge"), live_cost_params(), edge=edge,
                            settings=OrchestratorSettings(max_tokens=8))
        events = []
        results = [orch.turn(p, on_event=lambda k, d: events.append(k))
                   for p in ("Hello.", "Name a colour.", "Name a fruit.", "Name a city.")]
        assert [(r.telemetry.target, r.telemetry.fallback) for r in results] == [
            ("edge", False), ("edge", False), ("device", True), ("edge", False)]
        assert "malformed final message" in results[2].fallback_reason and "edge_lost" in events
        sid = orch.edge_session.id
        held = [m.to_dict() for m in server.servicer.pool.transcript(sid)]
        assert held == orch.transcript and len(held) == 8
        assert [m["content"] for m in orch.transcript].count("Name a fruit.") == 1
        orch.close()


# --- the command line ---------------------------------------------------------------------

FAST = ["--max-tokens", "6", "--threads", "1", "--n-ctx", "1024"]
DIALOGUE = ["Hello.", "Name a colour.", "Name a fruit.", "Name a city.", "Name an animal.", "Name a number."]


def _script(tmp_path) -> str:
    import json

    path = tmp_path / "turns.jsonl"
    path.write_text(json.dumps({"history": [{"user": u} for u in DIALOGUE]}) + "\n")
    return str(path)


def _records(stdout: str) -> list[dict]:
    import json

    from device_runtime.runtime.telemetry import validate_record

    records = [json.loads(line) for line in stdout.splitlines()]
    for r in records:
        validate_record(r)
    return records


def test_bad_credential_flags_are_one_line_errors_before_any_model_loads(run_cli, pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    token = tmp_path / "edge.token"
    token.write_text(new_token() + "\n")
    cert, _ = pki.client("device-d")
    edge = ["--edge", "127.0.0.1:9"]
    cases = [
        (["chat", *edge, "--tls-ca", str(tmp_path / "missing.crt")], "cannot read CA file"),
        (["chat", *edge, "--tls-ca", str(garbage)], "no PEM certificate"),
        (["chat", *edge, "--tls-ca", str(pki.ca_cert), "--tls-cert", str(cert)], "go together"),
        (["chat", *edge, "--tls-cert", str(cert), "--tls-key", str(pki.ca_key)], "not a PEM certificate"),
        (["chat", *edge, "--token-file", str(tmp_path / "missing.token")], "cannot read token file"),
        (["chat", "--edge", "192.0.2.1:50051", "--token-file", str(token)], "clear text"),
        (["chat", "--tls-ca", str(pki.ca_cert)], "need --edge"),
        (["demo", "--tls-ca", str(pki.ca_cert)], "need --edge"),
        (["demo", *edge, "--tls-ca", str(garbage)], "no PEM certificate"),
        (["profile", *edge, "--json", "--tls-ca", str(garbage)], "no PEM certificate"),
    ]
    for args, why in cases:
        proc = run_cli(*args, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-1000:])
        assert proc.stdout == "" and why in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert token.read_text().strip() not in proc.stderr


@pytest.fixture(scope="module")
def secure_model_edge(pki, token):
    """The real edge model behind TLS and a token file (contract of issue 13)."""
    settings = EdgeSettings(tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens=token[1],
                            n_ctx=2048, n_slots=1, n_threads=1)
    with EdgeServerThread(settings) as server:
        yield server


@pytest.mark.slow
def test_chat_over_tls_with_a_token_keeps_kv_reuse_on_both_sides(run_cli, secure_model_edge, pki, token, tmp_path):
    token_file = tmp_path / "edge.token"
    token_file.write_text(token[0] + "\n")
    proc = run_cli("chat", "--edge", secure_model_edge.target, "--tls-ca", str(pki.ca_cert),
                   "--token-file", str(token_file), "--policy", "random", "--seed", "0",
                   "--script", _script(tmp_path), "--json", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert token[0] not in proc.stderr
    recs = _records(proc.stdout)
    assert len(recs) == len(DIALOGUE) and not any(r["fallback"] for r in recs)
    for side in ("edge", "device"):
        turns = [r for r in recs if r["target"] == side]
        assert len(turns) >= 2, [r["target"] for r in recs]
        # After a side's first turn, each of its turns reuses its KV cache.
        assert all(r["cached_tokens"] > 0 for r in turns[1:]), (side, turns)


@pytest.mark.slow
def test_chat_with_refused_credentials_or_no_tls_falls_back_and_exits_zero(
    run_cli, secure_model_edge, pki, tmp_path,
):
    from conftest import cli_env

    wrong = new_token()
    script = _script(tmp_path)
    runs = [
        # A wrong token from the environment: UNAUTHENTICATED on each edge turn.
        (["--tls-ca", str(pki.ca_cert)], cli_env(**{ENV_TOKEN: wrong}), "the edge refused the credentials"),
        # A plaintext client on the TLS port: unavailable, with the hint.
        ([], cli_env(), "if it serves TLS, give --tls-ca"),
    ]
    for flags, env, why in runs:
        proc = run_cli("chat", "--edge", secure_model_edge.target, *flags, "--policy", "edge",
                       "--script", script, "--json", *FAST, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        recs = _records(proc.stdout)
        assert [(r["target"], r["fallback"]) for r in recs] == [("device", True)] * len(DIALOGUE)
        assert recs[-1]["context_tokens"] > 0  # the conversation went on, on the device
        assert why in proc.stderr and wrong not in proc.stderr


@pytest.mark.slow
def test_profile_measures_the_link_over_tls_with_a_token(run_cli, secure_edge, pki, token, tmp_path):
    import json

    token_file = tmp_path / "edge.token"
    token_file.write_text(token[0] + "\n")
    common = ["profile", "--edge", secure_edge.target, "--parts", "link", "--sizes", "0,4096",
              "--link-reps", "1", "--threads", "1", "--json", "--tls-ca", str(pki.ca_cert)]
    proc = run_cli(*common, "--token-file", str(token_file), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Table I" not in json.loads(proc.stdout)["sources"]["overhead_s"]  # measured over TLS
    refused = run_cli(*common, timeout=300)  # no token: the edge refuses, the profile says so
    assert refused.returncode == 1 and "the edge refused the credentials" in refused.stderr
