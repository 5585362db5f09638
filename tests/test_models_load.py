"""Every model a job trains loads back: custom layers, Lambda layers, subclassed models,
custom losses and metrics, in this kernel, in a new kernel, on the executors (`predict`)
and as a SavedModel served by a process that never ran the cell.

Each kind trains as a 2-worker job on the shared local[2] session. The chief checks that
its saved file loads and predicts as the trained model did (training/model_check.py);
a model whose file is a different model fails its job, naming the reason and the fix.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run

from tfos_magic import TfosError, get_job

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range(2000, numPartitions=2).select("id", F.rand(1).alias("a"), F.rand(2).alias("b"))
df = df.withColumn("y", 3 * F.col("a") - 2 * F.col("b"))
df
"""
HEAD = "%%tf_train {name} --workers {workers} --epochs 2 --batch-size 50 --label y --features a,b{extra}\n"
COMMON = """import tensorflow as tf

def dense_model(inner, loss="mse", metrics=None):
    inputs = tf.keras.Input((2,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1)(inner(inputs)))
    # 0.05: the 40 steps move a linear model well off its initial draw (at 0.01, a simulation
    # of the linear kinds left 2% of draws with predictions flatter than the 0.05 asserted).
    model.compile(tf.keras.optimizers.Adam(0.05), loss=loss, metrics=metrics)
    return model
"""
KINDS = {
    "lambda_layer": """
def build_model():
    return dense_model(tf.keras.layers.Lambda(lambda t: t * 2.0 - 1.0))
""",
    "layer_with_config": """
class Scale(tf.keras.layers.Layer):
    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}

def build_model():
    return dense_model(Scale(1.7))
""",
    "layer_without_config": """
class Affine(tf.keras.layers.Layer):
    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        # Positive weights: the features are positive, so no ReLU unit starts dead (with the
        # default initializer, a draw whose units were all dead predicted a constant).
        self.w = self.add_weight(name="kernel", shape=(shape[-1], self.units),
                                 initializer=tf.keras.initializers.RandomUniform(0.1, 1.0))

    def call(self, x):
        return tf.nn.relu(tf.matmul(x, self.w))

def build_model():
    return dense_model(Affine(6))
""",
    "subclassed_model": """
class Net(tf.keras.Model):
    def __init__(self, hidden=8):
        super().__init__()
        self.hidden = tf.keras.layers.Dense(hidden, activation="relu")
        self.out = tf.keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))

def build_model():
    model = Net(8)
    model.compile(tf.keras.optimizers.Adam(0.05), loss="mse")
    return model
""",
    "custom_loss": """
def scaled_mse(y_true, y_pred):
    return 2.0 * tf.reduce_mean(tf.square(y_true - y_pred))

def build_model():
    return dense_model(lambda x: x, loss=scaled_mse)
""",
    "custom_metric": """
def worst_error(y_true, y_pred):
    return tf.reduce_max(tf.abs(y_true - y_pred))

def build_model():
    return dense_model(lambda x: x, metrics=[worst_error])
""",
}
CELL_NAMES = {"Scale", "Affine", "Net", "scaled_mse", "worst_error", "dense_model", "build_model"}


def _train(shell, name: str, body: str, workers: int = 2, extra: str = ""):
    for cell in (ETL.format(name=name), HEAD.format(name=name, workers=workers, extra=extra) + COMMON + body):
        _, err = run(shell, cell)
        if err is not None:
            return err
    return None


def _rows(df, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rows = df.orderBy("id").limit(n).collect()
    return np.array([r["id"] for r in rows]), np.array([[r["a"], r["b"]] for r in rows], np.float32)


@pytest.mark.e2e
def test_every_kind_of_model_loads_back_everywhere(shell, tfos_home, tmp_path):
    """Six 2-worker jobs; each model agrees with itself in this kernel, on the executors,
    in a new kernel, and as a SavedModel served without the cell."""
    expected: dict[str, list[float]] = {}
    for name, body in KINDS.items():
        err = _train(shell, name, body)
        job = get_job(name)
        assert err is None and job.state == "succeeded", (name, err, job.error)
        assert job.history[-1]["loss"] < job.history[0]["loss"], (name, job.history)
        df = shell.user_ns["df"]
        ids, x = _rows(df)
        here = job.load_model().predict(x, verbose=0).reshape(-1)
        scored = {r["id"]: r["prediction"] for r in job.predict(df).where(f"id <= {int(ids.max())}").collect()}
        np.testing.assert_allclose([scored[i] for i in ids], here, atol=1e-4, rtol=1e-4, err_msg=name)
        assert np.std(here) > 0.05, (name, "predictions should vary with the features")
        job.export(str(tmp_path / "saved" / name))
        expected[name] = here.tolist()
        assert not CELL_NAMES & set(shell.user_ns), "loading a model must not change the notebook's namespace"
    np.save(tmp_path / "x.npy", x)

    # A new kernel: only the job store is shared with this one.
    from jupyter_client.manager import start_new_kernel

    # Without the suite's TF_USE_LEGACY_KERAS: importing tfos_magic first must choose it, as
    # for a user's fresh kernel or script.
    fresh_env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    km, kc = start_new_kernel(kernel_name="python3", env={**fresh_env, "TFOS_HOME": str(tfos_home)})
    try:
        code = textwrap.dedent(f"""
            import json, numpy as np, tfos_magic
            x = np.load({str(tmp_path / 'x.npy')!r})
            print(json.dumps({{n: tfos_magic.get_job(n).load_model().predict(x, verbose=0).reshape(-1).tolist()
                              for n in {list(KINDS)!r}}}))
        """)
        printed = []
        reply = kc.execute_interactive(code, timeout=300, output_hook=lambda m: printed.append(
            m["content"].get("text") or m["content"].get("evalue") or ""))
        assert reply["content"]["status"] == "ok", "".join(printed)
        fresh = json.loads("".join(printed).strip().splitlines()[-1])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    for name in KINDS:
        np.testing.assert_allclose(fresh[name], expected[name], atol=1e-4, rtol=1e-4, err_msg=name)

    # Served by a process that imports only TensorFlow: no cell, no tfos-magic, no Keras classes.
    serve = textwrap.dedent(f"""
        import json, sys, numpy as np, tensorflow as tf
        x = np.load({str(tmp_path / 'x.npy')!r})
        out = {{}}
        for name in {list(KINDS)!r}:
            f = tf.saved_model.load({str(tmp_path / 'saved')!r} + "/" + name).signatures["serving_default"]
            out[name] = f(features=tf.constant(x))["prediction"].numpy().reshape(-1).tolist()
        assert "tfos_magic" not in sys.modules and "__tfos_train__" not in sys.modules
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", serve], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    for name in KINDS:
        np.testing.assert_allclose(served[name], expected[name], atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.e2e
def test_a_ps_job_with_a_custom_layer_loads_back(shell, tmp_path):
    err = _train(shell, "ps_custom", KINDS["layer_with_config"], workers=1, extra=" --strategy ps --ps 1")
    job = get_job("ps_custom")
    assert err is None and job.state == "succeeded", (err, job.error)
    assert job.model_path.endswith(".h5")
    df = shell.user_ns["df"]
    ids, x = _rows(df)
    here = job.load_model().predict(x, verbose=0).reshape(-1)
    scored = {r["id"]: r["prediction"] for r in job.predict(df).where(f"id <= {int(ids.max())}").collect()}
    np.testing.assert_allclose([scored[i] for i in ids], here, atol=1e-4, rtol=1e-4)
    import tensorflow as tf

    path = job.export(str(tmp_path / "saved"))
    served = tf.saved_model.load(path).signatures["serving_default"](features=tf.constant(x))["prediction"]
    np.testing.assert_allclose(served.numpy().reshape(-1), here, atol=1e-4, rtol=1e-4)


OWN_LOOP = KINDS["layer_with_config"].replace("def build_model():\n    return dense_model(Scale(1.7))", """
def train(ctx):
    with ctx.strategy.scope():
        model = dense_model(Scale(1.7))
    for epoch in range(8):
        for x, y in ctx.dataset():
            model.train_on_batch(x, y)
    return model
""")


@pytest.mark.e2e
def test_a_model_that_train_ctx_returns_loads_back(shell):
    assert "def train(ctx)" in OWN_LOOP and "def build_model" not in OWN_LOOP
    err = _train(shell, "own_loop", OWN_LOOP, workers=1)
    job = get_job("own_loop")
    assert err is None and job.state == "succeeded", (err, job.error)
    df = shell.user_ns["df"]
    ids, x = _rows(df)
    here = job.load_model().predict(x, verbose=0).reshape(-1)
    scored = {r["id"]: r["prediction"] for r in job.predict(df).where(f"id <= {int(ids.max())}").collect()}
    np.testing.assert_allclose([scored[i] for i in ids], here, atol=1e-4, rtol=1e-4)
    assert np.corrcoef(here, x @ np.array([3.0, -2.0]))[0, 1] > 0.7, "it trained"


# Its get_config() forgets `factor`: the loaded layer scales by 1.0, not 3.0.
FORGETS_AN_ARGUMENT = KINDS["layer_with_config"].replace(
    'return {**super().get_config(), "factor": self.factor}', "return super().get_config()").replace("1.7", "3.0")
assert FORGETS_AN_ARGUMENT != KINDS["layer_with_config"]


UNSAVABLE = """
class Activation(tf.keras.layers.Layer):
    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def call(self, x):
        return self.fn(x)

def build_model():
    return dense_model(Activation(tf.nn.tanh))
"""
UNNAMED_WEIGHT = KINDS["layer_without_config"].replace('name="kernel", ', "")


@pytest.mark.e2e
def test_a_model_that_loads_as_another_model_fails_its_job_with_the_fix(shell):
    err = _train(shell, "forgetful", FORGETS_AN_ARGUMENT)
    job = get_job("forgetful")
    assert isinstance(err, TfosError), err
    assert job.state == "failed", job.state
    for words in ("predicts differently from the trained model", "get_config()", "every argument"):
        assert words in job.error, job.error
    assert job.history and job.history[-1]["epoch"] == 2, "it trained; only its saved model is unusable"

    # A weight without a name cannot be checkpointed: said before training, naming the layer.
    err = _train(shell, "unnamed", UNNAMED_WEIGHT)
    job = get_job("unnamed")
    assert isinstance(err, TfosError) and job.state == "failed", (err, job.state)
    assert "'affine' (Affine) makes a weight with add_weight() and no name" in job.error, job.error
    assert not job.history, "the error comes before the first epoch"

    # A custom layer without get_config whose __init__ takes a function: Keras cannot make
    # it again from the file; the job says so, with the fix, after training.
    err = _train(shell, "unsavable", UNSAVABLE)
    job = get_job("unsavable")
    assert isinstance(err, TfosError) and job.state == "failed", (err, job.state)
    assert "get_config" in job.error and any(
        words in job.error for words in ("cannot be saved", "cannot be loaded back", "predicts differently")), job.error


# --- fast tests of the pieces -------------------------------------------------

def test_only_definitions_run_and_a_failing_one_is_named():
    from tfos_magic.protocol.cell_definitions import MODULE, CellDefinitions

    source = textwrap.dedent("""
        import math
        try:
            import no_such_module_here
        except ImportError:
            no_such_module_here = None
        WIDTH = 3
        DATA = open("/only/on/the/workers.csv").read()
        started = []
        started.append("trained")
        for i in range(3):
            started.append(i)
        def build_model():
            started.append("built")
        class Layer:
            pass
        build_model()
    """)
    defs = CellDefinitions(source, "j")
    module = defs.module
    assert module.__name__ == MODULE and module.WIDTH == 3 and module.no_such_module_here is None
    assert module.started == [], "calls, loops and expressions do not run"
    assert len(defs.skipped) == 1 and defs.skipped[0].startswith("line 9: FileNotFoundError"), defs.skipped
    assert set(defs.custom_objects()) == {"build_model", "Layer"}
    before = sys.modules.get(MODULE)
    with defs.installed():
        assert sys.modules[MODULE] is module
    assert sys.modules.get(MODULE) is before


def test_a_file_others_may_write_is_not_trusted(tmp_path):
    from tfos_magic.protocol.model_file import trust_problem

    path = tmp_path / "model.keras"
    path.write_bytes(b"x")
    os.chmod(tmp_path, 0o700)
    assert trust_problem(str(path)) is None
    assert trust_problem("gs://bucket/job/model.keras") is None, "remote storage keeps its own permissions"
    os.chmod(path, 0o664)
    assert "may be written by other users (mode 664)" in trust_problem(str(path))
    os.chmod(path, 0o600)
    os.chmod(tmp_path, 0o777)
    assert "may be written by other users (mode 777)" in trust_problem(f"file://{path}")
    os.chmod(tmp_path, 0o700)
    if os.getuid() == 0:
        os.chown(path, 12345, -1)
        assert "belongs to another user (uid 12345)" in trust_problem(str(path))


@pytest.mark.e2e
def test_an_untrusted_lambda_is_refused_with_the_reason(tmp_path):
    """Built in a subprocess (legacy tf.keras must be chosen before TF loads)."""
    code = textwrap.dedent(f"""
        import os
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tensorflow as tf
        from tfos_magic.errors import TfosError
        from tfos_magic.protocol.model_file import load_model
        inputs = tf.keras.Input((2,))
        tf.keras.Model(inputs, tf.keras.layers.Lambda(lambda t: t * 2.0)(inputs)).save({str(tmp_path / 'm.keras')!r})
        assert load_model({str(tmp_path / 'm.keras')!r}, None, "j") is not None
        os.chmod({str(tmp_path / 'm.keras')!r}, 0o666)
        try:
            load_model({str(tmp_path / 'm.keras')!r}, None, "j")
        except TfosError as exc:
            print(exc)
    """)
    os.chmod(tmp_path, 0o700)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds a Lambda layer" in done.stdout and "may be written by other users (mode 666)" in done.stdout, \
        done.stdout


def test_the_reasons_name_the_fix():
    from tfos_magic.protocol.model_file import why_not_loadable

    missing = why_not_loadable("m.h5", ValueError("Unknown layer: 'Scale'. Please ensure ..."), None)
    assert "'Scale' is not defined at the top level of the %%tf_train cell" in missing
    rebuilt = why_not_loadable("m.keras", TypeError("__init__() missing 1 required positional argument: 'k'"), None)
    assert "get_config() that returns every argument of its __init__" in rebuilt
