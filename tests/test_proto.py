"""The edge API: committed stubs match the .proto, and the domain types round-trip."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from edgeroute.v1 import edge_pb2
from edgeroute.v1.types import GenerationParams, GenerationSummary, Message, ServerInfo, messages_to_pb

ROOT = Path(__file__).resolve().parent.parent


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_stubs_gives_no_diff():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) generates the stubs")
    stale = _gen_proto().stale_stubs()
    assert stale == [], f"run: python scripts/gen_proto.py  (stale: {stale})"


def test_check_mode_exit_code():
    pytest.importorskip("grpc_tools")
    assert _gen_proto().main(["--check"]) == 0


def test_proto_tree_mirrors_the_import_path():
    protos = sorted(p.relative_to(ROOT / "proto") for p in (ROOT / "proto").rglob("*.proto"))
    assert protos == [Path("edgeroute/v1/edge.proto")]
    assert edge_pb2.DESCRIPTOR.package == "edgeroute.v1"
    service = edge_pb2.DESCRIPTOR.services_by_name["EdgeLLM"]
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert {m.name for m in service.methods} == {"OpenSession", "CloseSession", "Generate", "Echo", "GetServerInfo"}
    assert [f.name for f in edge_pb2.GenerateResponse.DESCRIPTOR.oneofs_by_name["event"].fields] == ["chunk", "done"]


def test_generation_params_round_trip_and_validate():
    p = GenerationParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=7, stop=["\n\n"])
    assert p.stop == ("\n\n",)
    assert GenerationParams.from_pb(p.to_pb()) == p
    # top_p unset on the wire means 1, not 0.
    assert GenerationParams.from_pb(edge_pb2.GenerationParams(max_tokens=4)).top_p == 1.0
    for bad in (
        dict(max_tokens=0), dict(max_tokens=-1), dict(max_tokens=True), dict(temperature=-0.1),
        dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1),
        dict(seed=2**32), dict(stop=("",)), dict(stop=tuple("x" * 17)),
    ):
        with pytest.raises(ValueError):
            GenerationParams(**bad)
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationParams.from_pb(edge_pb2.GenerationParams(max_tokens=-3))


def test_messages_round_trip_and_reject_bad_roles():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    pbs = messages_to_pb(msgs)
    assert [Message.from_pb(m).to_dict() for m in pbs] == msgs
    with pytest.raises(ValueError, match="role"):
        Message.from_dict({"role": "tool", "content": "x"})
    with pytest.raises(ValueError):
        Message.from_dict({"content": "x"})
    with pytest.raises(ValueError, match="ROLE_UNSPECIFIED"):
        Message.from_pb(edge_pb2.Message(content="x"))
    with pytest.raises(ValueError, match="99"):
        Message.from_pb(edge_pb2.Message(role=99, content="x"))


def test_summary_and_info_round_trip():
    s = GenerationSummary(
        prompt_tokens=30, prefill_tokens=10, cached_tokens=20, output_tokens=5,
        prefill_s=0.1, decode_s=0.2, ttft_s=0.12, queue_s=0.001, finish_reason="length", kv_restored=True,
    )
    assert GenerationSummary.from_pb(s.to_pb()) == s
    with pytest.raises(ValueError):
        GenerationSummary(prompt_tokens=-1, prefill_tokens=0, cached_tokens=0, output_tokens=0, prefill_s=0, decode_s=0)
    info = ServerInfo("llama_cpp", "m.gguf", "plain", 2048, 2, 256, 1 << 24)
    assert ServerInfo.from_pb(info.to_pb()) == info


