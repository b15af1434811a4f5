"""Session affinity over upstreams: rendezvous hashing moves about 1/N of the
sessions when one of N upstreams comes or goes, and none while all stay."""

from __future__ import annotations

import pytest

from edge_service.backends.openai_wire import affinity_key
from edge_service.upstreams import UpstreamSet, parse_upstream_urls, rendezvous_order

KEYS = [affinity_key("p", f"session-{i}") for i in range(10_000)]


def homes(urls) -> dict[str, str]:
    return {k: rendezvous_order(k, urls)[0] for k in KEYS}


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_adding_or_removing_one_of_n_moves_about_one_nth(n):
    urls = [f"http://10.0.0.{i}:8000/v1" for i in range(n + 1)]
    before, after = homes(urls[:n]), homes(urls)
    moved = [k for k in KEYS if before[k] != after[k]]
    # Only sessions that now belong to the new upstream move, about 1/(n+1) of them.
    assert all(after[k] == urls[n] for k in moved)
    assert abs(len(moved) / len(KEYS) - 1 / (n + 1)) < 0.02
    # Removing it again sends exactly those sessions back.
    assert homes(urls[:n]) == before


def test_the_spread_is_even_and_the_order_stable():
    urls = [f"http://10.0.0.{i}:8000/v1" for i in range(4)]
    first = homes(urls)
    counts = {u: sum(1 for h in first.values() if h == u) for u in urls}
    assert all(abs(c / len(KEYS) - 0.25) < 0.02 for c in counts.values())
    # The same on every call and whatever order the URLs are given in (every gateway agrees).
    assert homes(list(reversed(urls))) == first


def test_a_session_stays_on_its_healthy_upstream_and_moves_only_while_it_is_down():
    upstreams = UpstreamSet([f"http://10.0.0.{i}:8000/v1" for i in range(3)])
    key = KEYS[0]
    home = upstreams.plan(key)[0]
    assert all(upstreams.plan(key)[0] == home for _ in range(100))
    upstreams.mark(home, False, "connect refused")
    plan = upstreams.plan(key)
    assert plan[0] != home and plan[-1] == home  # still tried, last
    upstreams.mark(home, True)
    assert upstreams.plan(key)[0] == home


def test_urls_are_checked_and_normalised():
    assert parse_upstream_urls(["http://h:1/v1/"]) == ("http://h:1/v1",)
    for bad in (["ftp://h/v1"], ["h:1"], [], ["http://h/v1?x=1"]):
        with pytest.raises(ValueError):
            parse_upstream_urls(bad)
