import os

import numpy as np
import pytest
from hypothesis import settings

# Hypothesis: deterministic and bounded so the suite stays fast on 2 cores.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
