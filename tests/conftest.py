import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("parity")

from parity import have_models, manifest  # noqa: E402
from tiny import FIXTURES, write_tiny_model  # noqa: E402

needs_shared = pytest.mark.skipif(
    not FIXTURES.exists(), reason=f"shared fixtures not found at {FIXTURES} (they sit beside the checkout in CI)"
)


def needs_set_a(*models: str) -> pytest.MarkDecorator:
    """Skip unless the fixtures (parity.FIXTURES) are set A with these models: the family tests pin numbers
    (geometry, token counts, HF checksums) derived from set A's models and images."""
    return pytest.mark.skipif(
        manifest().get("set") != "A" or not have_models(*models),
        reason=f"needs fixture set A with {', '.join(models)} (shared fixtures absent, or another set)",
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", "llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: a server or scheduler thread computes beside the test thread
    on a 2-core machine (two OpenMP threads each would spin), and the references computed here use the same
    thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
