import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny checkpoint directory with a trained BPE tokenizer (made once per session)."""
    from psyche.weights import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (../shared/data beside the clone)")
    return SHARED_DATA
