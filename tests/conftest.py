import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FIXTURES, write_tiny_model  # noqa: E402

needs_shared = pytest.mark.skipif(
    not FIXTURES.exists(), reason=f"shared fixtures not found at {FIXTURES} (they sit beside the checkout in CI)"
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", "llama")
