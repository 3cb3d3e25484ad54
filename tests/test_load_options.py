"""ocula.load refuses bad threads / n_ctx / device values with a ValueError naming them (not a torch traceback)."""
import pytest
import torch

import ocula


@pytest.mark.parametrize("kw, message", [
    (dict(threads=-2), "threads must be a whole number >= 1, got -2"),
    (dict(threads=0), "threads must be a whole number >= 1, got 0"),
    (dict(n_ctx=-5), "n_ctx must be a positive number of tokens"),
    (dict(device="tpu"), "device 'tpu' is not a device name torch knows"),
    (dict(device="meta"), "device 'meta' is not supported: ocula runs on cpu or cuda"),
])
def test_bad_load_options(tiny_llama, kw, message):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=message):
        ocula.load(tiny_llama, **kw)
    assert torch.get_num_threads() == threads


def test_cuda_without_cuda(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ocula.UnsupportedError, match="device 'cuda' asked for, but"):
        ocula.load(tiny_llama, device="cuda")
