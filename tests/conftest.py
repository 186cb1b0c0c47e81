import os
import warnings

import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def megatron_single():
    """Single-process gloo group with TP=PP=1 (Megatron modules need parallel_state)."""
    from crnet_megatron.parallel import destroy_distributed, init_distributed
    from tests.helpers import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(1, 1, seed=1234)
    yield
    destroy_distributed()
