"""The layout shows which process runs a line, and the imports keep it true.

kernel (magics, session, driver/, job/, ui/, examples/) -> protocol/; task/ -> protocol/;
training/ -> protocol/; protocol/ -> nothing of the package but errors; the command
line (cli/) drives jobs as a kernel does, so it may import the kernel side, never the reverse;
the Jupyter server's extension (server/) reads the job store (job/) and nothing else of the
kernel side, so it never loads Spark or TensorFlow.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "tfos_magic"
SIDES = {
    "cli": {"cli"},
    "server": {"server"},
    "kernel": {"api", "magics", "session", "driver", "job", "ui", "examples", "__init__"},
    "task": {"task"},
    "training": {"training"},
    "shared": {"protocol", "errors"},
}
ALLOWED = {
    "cli": {"cli", "kernel", "shared"},
    "server": {"server", "shared"},
    "kernel": {"kernel", "shared"},
    "task": {"task", "shared"},
    "training": {"training", "shared"},
    "shared": {"shared"},
}
# The one part of the kernel side the server extension may use: the store and its readers.
SERVER_READS = {"job"}
# The kernel hands Spark the tasks' entry points: the only places it names task code.
ENTRY_POINTS = {("driver/launcher.py", "task.feeder"), ("driver/predict.py", "task.predictor"),
                ("driver/checkpoint_dir.py", "task.visibility")}
# A prediction task runs the model in Spark's Python worker itself, every process loads
# a saved model through one shared loader, and hands a TF model its arrays as tensors
# through one shared converter (all lazily importing TF); the training task never
# imports TensorFlow.
MODEL_RUNNING_TASKS = {"task/predictor.py", "protocol/model_file.py", "protocol/tensors.py"}


def _side(component: str) -> str:
    return next(side for side, parts in SIDES.items() if component in parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(dotted module inside the package, line) for every import, at any depth (lazy ones too)."""
    rel = path.relative_to(PACKAGE)
    here = list(rel.parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                found += [(n, node.lineno) for n in names]
            elif node.module and node.module.startswith("tfos_magic"):
                found.append((node.module.removeprefix("tfos_magic").lstrip("."), node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("tfos_magic").lstrip("."), node.lineno) for a in node.names
                      if a.name.startswith("tfos_magic")]
    return found


def _external(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _component(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_belongs_to_a_side():
    for path in _modules():
        _side(_component(path))  # StopIteration names a module outside the map


def test_no_side_imports_another_except_through_the_shared_formats():
    broken = []
    for path in _modules():
        side = _side(_component(path))
        rel = str(path.relative_to(PACKAGE))
        for module, line in _imports(path):
            if not module:
                continue
            component = module.split(".")[0]
            target = _side(component)
            if side == "server" and component in SERVER_READS:
                continue
            if target not in ALLOWED[side] and (rel, module) not in ENTRY_POINTS:
                broken.append(f"{rel}:{line} ({side}) imports {module} ({target})")
    assert not broken, "\n".join(broken)


def test_the_tf_process_and_the_formats_import_no_spark_and_the_task_no_tensorflow():
    for path in _modules():
        component = _component(path)
        external = _external(path)
        if _side(component) in ("training", "shared"):
            assert not external & {"pyspark", "IPython", "jupyter_core"}, (path, external)
        if _side(component) == "server":
            assert not external & {"pyspark", "IPython", "tensorflow", "tf_keras"}, (path, external)
        if _side(component) in ("task", "shared") and str(path.relative_to(PACKAGE)) not in MODEL_RUNNING_TASKS:
            assert not external & {"tensorflow", "tf_keras"}, (path, external)


def test_importing_the_task_side_loads_neither_tensorflow_nor_jupyter():
    code = ("import sys, tfos_magic.task.feeder, tfos_magic.training.child, tfos_magic.training.arrow_feed\n"
            "print(sorted(m for m in ('tensorflow', 'pyspark', 'jupyter_core', 'IPython') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_server_extension_loads_neither_spark_nor_tensorflow():
    code = ("import sys, tfos_magic, tfos_magic.server\n"
            "assert tfos_magic._jupyter_server_extension_points() == [{'module': 'tfos_magic.server'}]\n"
            "print(sorted(m for m in ('tensorflow', 'pyspark', 'IPython', 'ipykernel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
