"""The generic name registry (``device_runtime.core.registry``) and the
registries built on it: routers, SLM backends, policies."""

from __future__ import annotations

import sys
import uuid

import pytest

from device_runtime.core.registry import Registry, RegistryError


class DomainError(RuntimeError):
    """Stands for a caller's own error type (RouterError, ...)."""


def test_a_name_registered_twice_is_an_error_and_the_first_stays():
    reg: Registry = Registry("widget")

    @reg.register("a")
    def first():
        return "first"

    with pytest.raises(RegistryError, match=r"widget 'a' is registered twice \(.*first and .*second\)"):
        @reg.register("a")
        def second():
            return "second"

    assert reg.create("a") == "first"
    with pytest.raises(RegistryError, match="non-empty string"):
        reg.register("")


def test_an_unknown_name_lists_the_valid_ones_lazy_ones_included():
    reg: Registry = Registry("widget", lazy={"zeta": "no.such.module"}, error=DomainError)
    reg.register("beta")(lambda: "b")
    reg.register("alpha")(lambda: "a")
    with pytest.raises(DomainError, match=r"^unknown widget 'nope'; available: alpha, beta, zeta$"):
        reg.get("nope")
    with pytest.raises(RegistryError, match="unknown widget 'nope'"):
        Registry("widget").create("nope")  # the default error type
    assert str(RegistryError("plain")) == "plain"  # not KeyError's quoted repr
    assert reg.names() == ["alpha", "beta", "zeta"]
    assert "zeta" in reg and "alpha" in reg and "nope" not in reg


def test_a_lazy_entry_is_imported_on_get_only(tmp_path, monkeypatch):
    """``names()`` and ``in`` read the lazy table; ``get`` imports the module,
    whose decorator registers the factory; ``create`` passes the arguments on."""
    tag = uuid.uuid4().hex[:8]
    host, late = f"reg_host_{tag}", f"reg_late_{tag}"
    (tmp_path / f"{host}.py").write_text(
        "from device_runtime.core.registry import Registry\n"
        f"REG = Registry('widget', lazy={{'late': '{late}'}})\n"
    )
    (tmp_path / f"{late}.py").write_text(
        f"from {host} import REG\n"
        "@REG.register('late')\n"
        "def make(x, *, y):\n"
        "    return ('late', x, y)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = __import__(host).REG
    try:
        assert reg.names() == ["late"] and "late" in reg
        assert late not in sys.modules
        assert reg.create("late", 1, y=2) == ("late", 1, 2)
        assert late in sys.modules
        assert reg.get("late") is sys.modules[late].make  # imported once
    finally:
        sys.modules.pop(host, None)
        sys.modules.pop(late, None)


def test_the_project_registries_list_their_names():
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
    from device_runtime.routing.policies import POLICIES, PolicySettings, create_policy

    # The order is --policy's choices, as it always was.
    assert POLICIES.names() == ["auto", "device", "edge", "random"]
    assert create_policy(PolicySettings(policy="edge")).name == "edge"
    assert create_policy(PolicySettings(policy="random", threshold=0.4, seed=3)).name == "random"
    with pytest.raises(ValueError, match="unknown policy 'nope'; available: auto, device, edge, random"):
        create_policy(PolicySettings(policy="nope"))
    assert SLM_BACKENDS.names() == ["llama-cpp"]
    with pytest.raises(ValueError, match="unknown SLM backend 'nope'; available: llama-cpp"):
        SLM_BACKENDS.create("nope", SLMSettings())
