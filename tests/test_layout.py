"""The project's shape: dependencies run one way, built-ins register as plugins do, and the README's
strategy-writing section works as printed."""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moectl.registry import get_strategy
from moectl.strategy import Strategy
from tests.util import REPO, assert_same_training, load_weights, run_moectl, train_run


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_strategies():
    offenders = {
        str(path.relative_to(REPO)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] == "strategies"
        )
        for path in (REPO / "moectl").rglob("*.py")
    }
    assert not {path: mods for path, mods in offenders.items() if mods}


def test_strategies_import_only_the_core():
    for path in [*(REPO / "strategies").glob("*.py"), REPO / "examples/naive_ep/naive_ep.py"]:
        project = {m for m in _imported_modules(path) if m.split(".")[0] in ("strategies", "tests", "bench")}
        assert not project, f"{path.name} imports {sorted(project)}"


def test_every_builtin_file_is_an_entry_point_naming_its_strategy():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
        "moectl.strategies"
    ]
    files = {p.stem for p in (REPO / "strategies").glob("*.py") if p.stem != "__init__"}
    assert {target.split(":")[0].removeprefix("strategies.") for target in declared.values()} == files
    for name in declared:
        cls = get_strategy(name)
        assert issubclass(cls, Strategy) and cls.name == name
    assert sorted(declared) == ["ddp", "ep", "fsdp", "mixed", "single", "tp"]


LAYOUT_FLAGS = ("--strategy", "--ep-size", "--nproc")


def _readme_commands(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text[text.index(section) :]
    block = body[body.index("```bash") + len("```bash") : body.index("```", body.index("```bash") + 7)]
    return [line.strip() for line in block.strip().splitlines()]


@pytest.mark.readme(_readme_commands("### Writing a strategy")[0])
def test_the_strategy_writing_section_works_as_printed(tmp_path, readme_run):
    """Both README commands: the plugin as a file (run as printed, shared with test_out_of_the_box),
    then packaged with its entry point. The package goes into a scratch directory rather than this
    environment (same pip, same metadata)."""
    file_command, package_command = _readme_commands("### Writing a strategy")
    args = shlex.split(file_command)
    assert args[0] == "moectl"
    result = readme_run(file_command)
    assert result.returncode == 0, result.stderr[-2000:]
    (by_file,) = (readme_run.cwd / "runs").glob("*-naive_ep")  # named after the file's stem

    install, train = package_command.split(" && ")
    install_args = shlex.split(install)
    assert install_args[:2] == ["pip", "install"]
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         *install_args[2:]],
        cwd=REPO, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    by_entry_point = tmp_path / "by-entry-point"
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = run_moectl(*shlex.split(train)[1:], "--run-dir", str(by_entry_point), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = load_weights(by_file / "model"), load_weights(by_entry_point / "model")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # and the naive baseline trains what `single` trains with the same flags
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    same_training = [
        item for flag, value in flags.items() if flag not in LAYOUT_FLAGS for item in (flag, value)
    ]
    single = train_run(tmp_path / "single", "--strategy", "single", *same_training, in_process=True)
    assert_same_training(by_file, single)


def test_a_source_checkout_that_was_not_installed_finds_the_builtins(monkeypatch):
    """PYTHONPATH=checkout (as on a machine where moectl is not pip-installed): the built-ins come from
    pyproject.toml's own entry-point declarations."""
    import importlib.metadata

    import moectl.registry as registry

    real = importlib.metadata.distribution

    def not_installed(name: str):
        if name == "moectl":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(registry, "distribution", not_installed)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    assert sorted(registry.available_strategies()) == ["ddp", "ep", "fsdp", "mixed", "single", "tp"]
    assert registry.get_strategy("ep").name == "ep"


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_builtin_layout_is_one_train_accepts_with_the_same_degrees(world):
    """On the tiny preset (whose shapes admit every strategy on 2 and 4 processes) each built-in's
    layouts build (`registry.build_strategy`, as `moectl bench` and `moectl plan` build them), and the
    `moectl train` flags a layout writes give the same degrees and options when train reads them back."""
    from moectl.config import apply_overrides, build_config, train_args_overrides
    from moectl.registry import available_strategies, build_strategy

    cfg = build_config("tiny")
    for name in available_strategies():
        strategy_cls = get_strategy(name)
        for layout in strategy_cls.layouts(world, cfg.model):
            built = build_strategy(layout.apply(cfg), world, strategy_cls)
            argv = ["--strategy", name, "--nproc", str(world), *layout.args()]
            from_flags = build_strategy(apply_overrides(cfg, train_args_overrides(argv, "test")), world)
            assert built.dims == from_flags.dims and built.dims.world_size == world, (name, argv)
            assert built.options == from_flags.options == layout.options, (name, argv)
            assert (built.redundant() is None) == (name != "mixed" or built.dims.dp > 1), (name, argv)
    offered = {name for name in available_strategies() if get_strategy(name).layouts(world, cfg.model)}
    # on one GPU ep 1 too: the dispatch's grouped GEMM without exchanges, measured faster than single
    assert offered == ({"single", "ep"} if world == 1 else {"ddp", "fsdp", "tp", "mixed", "ep"})


def _core_modules() -> dict[str, Path]:
    modules = {}
    for path in (REPO / "moectl").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def _runtime_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """moectl modules `path` imports when it runs (at import time or inside a function), leaving out the
    annotations-only imports under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for child in ast.walk(node)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def _import_graph() -> dict[str, set[str]]:
    modules = _core_modules()
    return {name: _runtime_imports(path, modules) - {name} for name, path in modules.items()}


def test_the_core_has_no_import_cycle():
    """Arrows run one way inside moectl/ too (a cycle such as launch -> worker -> train -> launch makes
    the order of imports matter and the layers meaningless)."""
    graph, state, cycles = _import_graph(), {}, []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_loop_reaches_neither_the_planner_nor_the_bench():
    """The loop never asks what the planner predicts or how the bench measures (the prediction in
    summary.json is made by the caller and handed in), directly or through anything it imports."""
    graph = _import_graph()
    reached, todo = set(), ["moectl.run.loop"]
    while todo:
        for imported in graph[todo.pop()] - reached:
            reached.add(imported)
            todo.append(imported)
    assert not {name for name in reached if name.startswith(("moectl.plan", "moectl.bench"))}


def test_the_readme_layout_names_every_module_once():
    """The README's Development section has one line per module of moectl/ (a package's modules
    indented under it), so a newcomer finds every file there."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Development") : text.index("### Testing")]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]
    listed, package = [], None
    for line in block.splitlines():
        word = line.split()[0] if line.strip() else ""
        if line.startswith("moectl/") and word.endswith("/"):
            package = word
        elif line.startswith("moectl/") and word.endswith(".py"):
            listed.append(word)
        elif line.startswith("  ") and word.endswith(".py") and package:
            listed.append(package + word)
    modules = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "moectl").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    )
    assert sorted(listed) == modules
    assert len(listed) == len(set(listed))
