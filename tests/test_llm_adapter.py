"""llama-cpp-python internals stay in ``device_runtime/llm/adapter.py``.

The adapter calls private APIs that change between releases, so two things
are checked: the installed version lies in the range ``pyproject.toml`` allows
(the range the adapter was checked against), and no other module reaches into
those internals, read from the source by AST so that a new one fails here.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "device_runtime" / "llm" / "adapter.py"
#: Where the project's Python lives (generated stubs are skipped).
SCANNED = ("device_runtime", "edge_service", "export", "netlab", "scripts", "proto", "tests")
#: Code that ships or runs as a tool: it may not import llama_cpp at all, only
#: the adapter does.  Tests may (to read ``__version__``, say), but not privately.
LIBRARY = ("device_runtime", "edge_service", "export", "netlab", "scripts", "proto")
#: Private attributes of ``Llama`` and of ``llama_cpp`` itself.
PRIVATE_ATTRS = {"_ctx", "_model", "_input_ids", "_internals", "_batch", "_sampler",
                 "_scores", "_candidates", "_stack", "_n_vocab", "_n_ctx"}
#: Public modules of the package whose names look like C-binding names.
PUBLIC_MODULES = {"llama", "llama_chat_format", "llama_grammar", "llama_cache",
                  "llama_tokenizer", "llama_types", "llama_speculative"}


def llama_cpp_requirements() -> dict[str, Requirement]:
    """extra -> the llama-cpp-python requirement it lists."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    out = {}
    for extra, reqs in data["project"]["optional-dependencies"].items():
        for text in reqs:
            req = Requirement(text)
            if req.name.replace("_", "-").lower() == "llama-cpp-python":
                out[extra] = req
    return out


def test_llama_cpp_python_is_bounded_alike_in_every_extra():
    reqs = llama_cpp_requirements()
    assert {"device", "edge"} <= set(reqs), f"llama-cpp-python is listed in {sorted(reqs)}"
    specs = {extra: str(r.specifier) for extra, r in reqs.items()}
    assert len(set(specs.values())) == 1, f"extras disagree on llama-cpp-python: {specs}"
    for extra, req in reqs.items():
        ops = {s.operator for s in req.specifier}
        assert ops & {">=", ">", "~=", "=="} and ops & {"<", "<=", "~=", "=="}, (
            f"[{extra}] llama-cpp-python{req.specifier} needs a lower and an upper bound: "
            "device_runtime/llm/adapter.py uses its private APIs"
        )


def test_installed_llama_cpp_python_is_in_the_supported_range():
    llama_cpp = pytest.importorskip("llama_cpp")
    spec = next(iter(llama_cpp_requirements().values())).specifier
    installed = Version(llama_cpp.__version__)
    assert spec.contains(installed, prereleases=True), (
        f"llama-cpp-python {installed} is installed, but pyproject.toml allows "
        f"llama-cpp-python{spec}; device_runtime/llm/adapter.py calls private APIs "
        "checked only in that range: check them against this version, then move the bound"
    )


# --- no private llama_cpp use outside the adapter ----------------------------------


def _low_level(name: str) -> bool:
    """A private or C-binding name of the ``llama_cpp`` package (``llama_cpp.llama_cpp``,
    ``_internals``, ``llama_token_to_piece`` ...)."""
    if name.startswith("__") and name.endswith("__"):
        return False  # __version__, __file__
    return name.startswith("_") or (name.startswith("llama_") and name not in PUBLIC_MODULES)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports there are for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _import_problems(node: ast.AST) -> tuple[list[str], bool]:
    """(private uses, whether it imports llama_cpp at all) of one import statement."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] == "llama_cpp"]
        bad = [f"import {n}" for n in names if any(_low_level(p) for p in n.split(".")[1:])]
        return bad, bool(names)
    if isinstance(node, ast.ImportFrom) and not node.level and node.module:
        parts = node.module.split(".")
        if parts[0] != "llama_cpp":
            return [], False
        private_module = any(_low_level(p) for p in parts[1:])
        bad = [f"from {node.module} import {a.name}" for a in node.names
               if private_module or (len(parts) == 1 and _low_level(a.name))]
        return bad, True
    return [], False


def _attribute_problem(node: ast.Attribute) -> str | None:
    """``x._ctx`` (not ``self._ctx``: a class's own attribute) or ``llama_cpp.llama_*``."""
    owner = node.value
    if isinstance(owner, ast.Name) and owner.id == "llama_cpp" and _low_level(node.attr):
        return f"llama_cpp.{node.attr}"
    if node.attr in PRIVATE_ATTRS and not (isinstance(owner, ast.Name) and owner.id in {"self", "cls"}):
        return f"{ast.unparse(owner)}.{node.attr}"
    return None


def private_llama_cpp_uses(source: str, library: bool = True) -> list[str]:
    """'line: what' for each reach into llama-cpp-python internals in ``source``;
    in library code any run-time import of ``llama_cpp`` counts too."""
    tree = ast.parse(source)
    typing_only = _type_checking_lines(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bad, imports = _import_problems(node)
            found += [f"{node.lineno}: {b}" for b in bad]
            if library and imports and not bad and node.lineno not in typing_only:
                found.append(f"{node.lineno}: imports llama_cpp (only the adapter may)")
        elif isinstance(node, ast.Attribute) and (what := _attribute_problem(node)):
            found.append(f"{node.lineno}: {what}")
    return found


def project_files() -> list[Path]:
    files = []
    for top in SCANNED:
        files += [p for p in sorted((ROOT / top).rglob("*.py"))
                  if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")) and ".venv" not in p.parts]
    return files


def test_only_the_adapter_reaches_into_llama_cpp_internals():
    problems = []
    for path in project_files():
        if path == ADAPTER:
            continue
        rel = path.relative_to(ROOT)
        library = rel.parts[0] in LIBRARY
        problems += [f"{rel}:{p}" for p in private_llama_cpp_uses(path.read_text(encoding="utf-8"), library)]
    assert not problems, (
        "llama-cpp-python internals used outside device_runtime/llm/adapter.py "
        "(add a function there instead):\n" + "\n".join(problems)
    )


def test_the_adapter_is_where_the_internals_are():
    """The scan above would pass vacuously if it could not see them."""
    assert private_llama_cpp_uses(ADAPTER.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "source",
    [
        "def f(llama):\n    llama._ctx.kv_cache_clear()\n",
        "def f(self):\n    return self.llama._model.vocab\n",
        "def f(llama):\n    return llama._input_ids\n",
        "def f():\n    from llama_cpp import _internals\n",
        "import llama_cpp.llama_cpp as C\n",
        "from llama_cpp.llama_cpp import llama_vocab_is_eog\n",
        "from llama_cpp._internals import LlamaSampler\n",
        "def f(v, t):\n    import llama_cpp\n    return llama_cpp.llama_vocab_is_eog(v, t)\n",
        "def f(llama_cpp):\n    return llama_cpp.llama_cpp\n",
        "def f():\n    import llama_cpp\n    return llama_cpp.Llama\n",  # library: adapter only
    ],
)
def test_a_planted_private_use_is_caught(source):
    assert private_llama_cpp_uses(source)


@pytest.mark.parametrize(
    "source, library",
    [
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llama_cpp\n", True),
        ("class R:\n    def __init__(self, m):\n        self._model = m\n", True),
        ("def f(llama):\n    return llama.tokenize(b'x'), llama.n_tokens, llama.metadata\n", True),
        ("from device_runtime.llm import adapter\nadapter.make_sampler(0.0, 1.0, 0)\n", True),
        ("import llama_cpp\nv = llama_cpp.__version__\n", False),  # a test may read the version
    ],
)
def test_public_use_passes(source, library):
    assert private_llama_cpp_uses(source, library) == []
