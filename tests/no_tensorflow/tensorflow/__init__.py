"""Put first on PYTHONPATH by the fast test tier (tests/conftest.py): a process it starts
that imports TensorFlow belongs to a test that needs the `e2e` mark."""

raise ImportError("The fast test tier starts no TensorFlow process: a test that trains or loads a model "
                  "needs @pytest.mark.e2e (tests/conftest.py).")
