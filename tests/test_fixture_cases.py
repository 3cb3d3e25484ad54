"""One test per case of the shared fixtures (or of the set named by $OCULA_FIXTURES), through the public API:
prompt ids equal HF's; pixel values within 1e-4; image features (and Qwen3-VL deepstack) within rtol 1e-4;
last-position logits within atol 1e-3 with the same argmax; greedy tokens equal up to the first HF step whose
top1-top2 margin is below 1e-3."""
import pytest
from parity import FIXTURES, manifest, run_case

CASES = manifest()["cases"]


@pytest.mark.skipif(not CASES, reason=f"no fixture manifest at {FIXTURES} (shared fixtures absent)")
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case_matches_hf(case):
    fig = run_case(case)
    assert fig["prompt_ids_equal"], fig
    if case["images"]:
        assert fig.get("pixel_max_abs", 0.0) <= 1e-4, fig  # absent where the npz leaves the pixels out
        assert fig["feature_rel_err"] <= 1e-4, fig
        assert fig.get("deepstack_rel_err", 0.0) <= 1e-4, fig
    assert fig["logits_max_abs"] <= 1e-3, fig
    assert fig["argmax_equal"], fig
    assert fig["greedy_prefix"] >= fig["greedy_checkable"], fig
