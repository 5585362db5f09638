"""The user's train cell, as source text: checked in the driver, run in the workers.

The filename given to `compile` names the job, and line numbers count the cell's
`%%` line as line 1, as the notebook shows them, so errors point at the right line.
"""

from __future__ import annotations

import ast
import linecache
from typing import Any

from ..errors import TfosError

ENTRY_POINTS = ("build_model", "train")


def cell_filename(job: str, kind: str = "tf_train") -> str:
    return f"<%%{kind} {job}>"


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _as_in_notebook(source: str) -> str:
    """The cell body with a blank first line standing in for the magic line."""
    return "\n" + source


def parse(source: str, job: str, kind: str = "tf_train") -> ast.Module:
    """Parse a cell, turning a SyntaxError into one message with the cell's line number."""
    try:
        return ast.parse(_as_in_notebook(source), filename=cell_filename(job, kind))
    except SyntaxError as exc:
        line = (exc.text or "").rstrip()
        raise TfosError(
            f"Syntax error in the %%{kind} cell of job {job!r}, line {exc.lineno}: {exc.msg}\n"
            f"    {line}\nFix the cell and run it again."
        ) from None


def check_train_source(source: str, job: str) -> str:
    """Return the entry point ('build_model' or 'train') the cell defines, or explain."""
    names = _top_level_names(parse(source, job))
    for entry in ENTRY_POINTS:
        if entry in names:
            return entry
    raise TfosError(
        f"The %%tf_train cell of job {job!r} defines neither build_model() nor train(ctx). "
        "Define build_model() returning a compiled tf.keras model (the framework runs fit), "
        "or train(ctx) with your own training loop over ctx.dataset(batch_size); in a %%torch_train cell, "
        "build_model() returns (model, optimizer, loss_fn), and train(ctx) loops over ctx.dataloader()."
    )


FIT_HOOKS = ("callbacks", "fit_options")  # functions of the cell that Keras' fit takes part of


def build_model_takes_sample(source: str, job: str) -> bool:
    """Whether the cell's build_model has a parameter: it then gets a sample of the
    training rows, for preprocessing layers' adapt() (driver/sample.py)."""
    for node in parse(source, job).body:
        if isinstance(node, ast.FunctionDef) and node.name == "build_model":
            return bool(node.args.posonlyargs or node.args.args)
    return False


def defines(source: str, job: str, name: str) -> bool:
    """Whether the cell defines `name` at its top level."""
    return name in _top_level_names(parse(source, job))


def fit_hooks(source: str, job: str) -> list[str]:
    """Which of FIT_HOOKS the cell defines at its top level."""
    names = _top_level_names(parse(source, job))
    return [h for h in FIT_HOOKS if h in names]


def run_cell(source: str, job: str, namespace: dict[str, Any], kind: str = "tf_train") -> Any:
    """Execute a cell in `namespace`, returning its last expression's value (as IPython does).

    The source is registered with linecache so tracebacks show the cell's own lines.
    """
    filename = cell_filename(job, kind)
    tree = parse(source, job, kind)
    text = _as_in_notebook(source)
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), namespace)
    return eval(compile(last, filename, "eval"), namespace) if last is not None else None
