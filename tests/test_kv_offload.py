"""The host KV store: a session whose slot another session took continues
from its own KV cache, exactly, and nobody else ever gets it."""

from __future__ import annotations

import pytest

from device_runtime.link.edge_client import EdgeClient, GenerationParams
from edge_service.kv_store import HostKvStore, KvSnapshot
from edge_service.server import EdgeServerThread
from edge_service.settings import EdgeSettings

GREEDY = GenerationParams(max_tokens=16, temperature=0.0)


def snap(n_bytes: int, n_tokens: int = 0) -> KvSnapshot:
    return KvSnapshot(b"x" * n_bytes, tuple(range(n_tokens)))


# --- the store ------------------------------------------------------------------------


def test_the_store_keeps_to_its_budget_dropping_the_oldest_first():
    store = HostKvStore(budget_bytes=250)
    assert store.put("a", snap(100)) and store.put("b", snap(100))
    assert store.put("c", snap(100))  # over budget: a (stored first) goes
    assert store.take("a") is None and store.nbytes == 200 and store.dropped == 1
    assert store.take("b") is not None and store.take("b") is None  # taken once: the slot holds it now
    assert len(store) == 1 and store.nbytes == 100


def test_a_newer_snapshot_replaces_the_older_and_counts_tokens():
    store = HostKvStore(budget_bytes=1000)
    store.put("a", snap(100, 10))
    store.put("a", snap(50, 5))
    assert len(store) == 1 and store.nbytes == 50 + 8 * 5


def test_too_large_or_off_stores_nothing_and_forget_drops():
    store = HostKvStore(budget_bytes=100)
    store.put("a", snap(10))
    assert not store.put("a", snap(500))  # larger than the whole budget: not kept (nor the old one)
    assert store.take("a") is None
    store.put("b", snap(10))
    store.forget("b")
    assert len(store) == 0 and store.nbytes == 0
    off = HostKvStore(budget_bytes=0)
    assert not off.put("a", snap(1)) and len(off) == 0
    with pytest.raises(ValueError):
        HostKvStore(budget_bytes=-1)


def test_the_setting_is_checked():
    with pytest.raises(ValueError, match="kv_offload_mib"):
        EdgeSettings(kv_offload_mib=-1)


# --- on a real model ---------------------------------------------------------------------


def _edge(kv_offload_mib: int) -> EdgeServerThread:
    return EdgeServerThread(EdgeSettings(n_ctx=1024, n_slots=1, n_threads=1, kv_offload_mib=kv_offload_mib))


def _turns(client: EdgeClient, sid: str, prompts: list[str], between=None) -> list:
    """Send ``prompts`` as the turns of ``sid`` (each with the transcript so
    far); ``between(i)`` runs after turn ``i``."""
    history: list[dict] = []
    results = []
    for i, prompt in enumerate(prompts):
        history.append({"role": "user", "content": prompt})
        r = client.generate(sid, history[-1:], GREEDY, transcript_length=len(history) - 1).consume()
        history.append({"role": "assistant", "content": r.text})
        results.append(r)
        if between is not None:
            between(i)
    return results


PROMPTS = ["Tell me one short fact about maps.", "Why does that matter to people?", "Give one more example."]


@pytest.mark.slow
def test_an_evicted_session_answers_as_if_it_had_kept_its_slot():
    with _edge(kv_offload_mib=64) as edge, EdgeClient(edge.target, timeout_s=120) as client:
        alone = _turns(client, client.open_session(), PROMPTS)
        other = client.open_session()
        store = edge.servicer.backend.kv_store

        def evict(i: int) -> None:  # one slot: another session takes it after every turn
            client.generate(other, [{"role": "user", "content": f"Count to {i + 3}."}], GREEDY).consume()

        evicted = _turns(client, client.open_session(), PROMPTS, between=evict)
        assert [r.text for r in evicted] == [r.text for r in alone]
        for before, r in zip(evicted, evicted[1:]):
            assert r.kv_restored and r.cached_tokens >= before.prompt_tokens  # nothing computed again
        assert store.restored >= 2


@pytest.mark.slow
def test_with_the_store_off_an_evicted_session_prefills_its_transcript():
    with _edge(kv_offload_mib=0) as edge, EdgeClient(edge.target, timeout_s=120) as client:
        a, b = client.open_session(), client.open_session()
        first = _turns(client, a, PROMPTS[:1])[0]
        client.generate(b, [{"role": "user", "content": "Count to 3."}], GREEDY).consume()
        r = client.generate(a, [{"role": "user", "content": PROMPTS[1]}], GREEDY, transcript_length=2).consume()
        assert r.kv_restored and r.cached_tokens < first.prompt_tokens and len(edge.servicer.backend.kv_store) == 0


@pytest.mark.slow
def test_a_closed_session_s_kv_leaves_host_memory_and_no_other_session_gets_it():
    with _edge(kv_offload_mib=64) as edge, EdgeClient(edge.target, timeout_s=120) as client:
        store = edge.servicer.backend.kv_store
        a, b = client.open_session(), client.open_session()
        same = [{"role": "user", "content": PROMPTS[0]}]
        client.generate(a, same, GREEDY).consume()
        rb = client.generate(b, same, GREEDY).consume()  # b takes the slot; a's KV goes to the store
        assert rb.cached_tokens == 0  # the same prompt, but a's cache is a's
        assert len(store) == 1
        client.close_session(a)
        assert len(store) == 0  # retention: the copy goes with the session
        client.close_session(b)  # b holds the slot; its KV is not copied out when the slot changes hands
        c = client.open_session()
        rc = client.generate(c, same, GREEDY).consume()
        assert rc.cached_tokens == 0 and len(store) == 0
