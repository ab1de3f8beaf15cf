"""The backend registry: lookup, fallback to the reference, clear errors."""
import numpy as np
import pytest

import backends
import reference


def test_numpy_backend_is_the_reference_in_float32():
    be = backends.get_backend("numpy")
    assert be.xp is np and be.dtype == np.float32 and be.overridden == frozenset()
    for name in reference.OPS:
        assert be.op(name) is reference.OPS[name]


def test_available_always_has_numpy_and_numba():
    names = backends.available()
    assert "numpy" in names and "numba" in names


def test_auto_picks_an_available_backend():
    assert backends.get_backend("auto").name in backends.available()


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match="available backends: .*numpy"):
        backends.get_backend("tpu")


def test_overrides_must_name_reference_ops():
    with pytest.raises(ValueError, match="does not define"):
        backends.Backend("bad", np, {"not_an_op": lambda: None})


def test_unknown_op_is_a_clear_error():
    with pytest.raises(AttributeError, match="no op named 'frobnicate'"):
        backends.get_backend("numpy").frobnicate
