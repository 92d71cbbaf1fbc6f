"""The owner's folder layout must not break the standard library."""

import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_stdlib_operator_and_fedkube_operator_import_from_the_repo_root():
    # Running from the root puts the root first on sys.path: the folder
    # operator/ must not shadow the standard library's operator module.
    code = (
        "import operator, collections, fedkube.operator.about as about;"
        "assert operator.itemgetter(1)([0, 7]) == 7;"
        "assert operator.__file__.endswith('operator.py'), operator.__file__;"
        "print(about.NAME)"
    )
    for args in (["-c", code], ["-S", "-c", "import operator; operator.eq"]):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_services_import_under_one_package_name():
    import fedkube.aggregator.combiner
    import fedkube.aggregator.global_aggregator
    import fedkube.workers.runtime

    assert fedkube.workers.runtime.Worker and fedkube.aggregator.combiner.Combiner


def test_the_slim_images_commands_import_without_the_training_stack():
    # The operator and the combiners run from the slim image, which has none of
    # [tool.fedkube.image] training-only: importing any of those packages must fail
    # here as it would there (the real-node tier runs the image itself).
    import tomllib

    left_out = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["fedkube"]["image"]
    modules = {"scikit-learn": "sklearn", "dp-accounting": "dp_accounting"}
    blocked = [modules.get(name, name) for name in left_out["training-only"]]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import fedkube.aggregator.combiner, fedkube.operator.main, fedkube.cli\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_every_package_folder_is_listed_in_pyproject_so_an_install_carries_it():
    # A non-editable install (the image) copies only the packages pyproject names:
    # a sub-package added on disk and not listed there would be missing from it.
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {Path(folder): name for name, folder in tool["package-dir"].items()}
    on_disk = set()
    for folder, name in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *relative.parts]))
    # operator/ is a namespace folder on purpose (no __init__.py, see operator/README.md).
    on_disk |= {name for name in folders.values()}
    assert on_disk == set(tool["packages"])


# What each layer of the core may import, besides the standard library and
# third-party packages: the shared contracts below it, never a service or an
# application above it. The applications (cli.py, local/, tools/) start the
# services, so they are the one place that imports them.
CORE_LAYERS = {
    "wire": {"fedkube.errors", "fedkube.spec", "fedkube.wire"},
    "service": {"fedkube.errors", "fedkube.spec", "fedkube.wire", "fedkube.service"},
    "state": {"fedkube.errors", "fedkube.spec", "fedkube.wire", "fedkube.service", "fedkube.state"},
}
SERVICES = ("fedkube.aggregator", "fedkube.workers", "fedkube.operator")
APPLICATIONS = ("fedkube.local", "fedkube.tools", "fedkube.cli")


def fedkube_imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("fedkube.")}


def within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_the_cores_lower_layers_import_only_what_lies_below_them():
    for layer, allowed in CORE_LAYERS.items():
        for path in sorted((ROOT / "core" / layer).glob("*.py")):
            outside = {name for name in fedkube_imports(path) if not within(name, allowed)}
            assert not outside, f"core/{layer}/{path.name} imports {sorted(outside)}"


def test_the_core_and_the_services_never_import_an_application_and_services_not_each_other():
    for path in sorted((ROOT / "core").rglob("*.py")):
        relative = path.relative_to(ROOT / "core")
        if relative.parts[0] in ("local", "tools") or relative.name == "cli.py":
            continue
        wrong = {n for n in fedkube_imports(path) if within(n, SERVICES + APPLICATIONS)}
        assert not wrong, f"core/{relative} imports {sorted(wrong)}"
    for service in ("aggregator", "workers", "operator"):
        others = tuple(s for s in SERVICES if s != f"fedkube.{service}")
        for path in sorted((ROOT / service).rglob("*.py")):
            wrong = {n for n in fedkube_imports(path) if within(n, others + APPLICATIONS)}
            assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
