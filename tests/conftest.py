import os

import numpy as np
import pytest

try:  # Hypothesis is part of the test extra; a bare GPU image may lack it.
    from hypothesis import settings
except ImportError:  # pragma: no cover
    settings = None

if settings is not None:
    # Deterministic and bounded so the suite stays fast on 2 cores.
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
