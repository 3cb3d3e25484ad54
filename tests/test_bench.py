"""`ocula bench`: JSON keys on a tiny model, ratio arithmetic, the --compare plumbing (no llama.cpp needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ocula import synth
from ocula.tools import bench
from ocula.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    r = synth.synthesize("SmolVLM-256M", "Q8_0", d, tiny_scale=True)  # synthesized vocabulary: no fixtures needed
    img = d / "img.png"
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(img)
    return r.model, r.mmproj, img


def test_bench_and_synth_are_registered():
    parser = build_parser()
    args = parser.parse_args(["bench", "-m", "x.gguf", "-p", "8", "-n", "2", "--reps", "2", "--json"])
    assert (args.n_prompt, args.n_gen, args.reps, args.json) == (8, 2, 2, True)
    args = parser.parse_args(["synth", "--preset", "Gemma-3-4B", "--quant", "Q8_0"])
    assert args.quant == ["Q8_0"]


def test_bench_json_has_the_documented_keys(tiny_vlm, capsys):
    model, mmproj, img = tiny_vlm
    rc = main(["bench", "-m", str(model), "--mmproj", str(mmproj), "--image", str(img), "-p", "24", "-n", "4",
               "--reps", "2", "--warmup", "0", "-t", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == {"config", "ocula"}
    r = report["ocula"]
    for key in ("load_ms", "peak_rss_mb", "images", "pp", "tg", "ttft_ms", "threads", "n_prompt", "n_gen", "reps"):
        assert key in r, key
    assert r["pp"]["tokens"] == 24 and r["tg"]["tokens"] == 4
    for s in (r["pp"]["tps"], r["tg"]["tps"], r["ttft_ms"]):
        assert set(s) == {"min", "median", "max", "values"} and len(s["values"]) == 2 and s["min"] > 0
    (im,) = r["images"]
    assert im["tokens"] > 0 and (im["width"], im["height"]) == (56, 40)
    assert im["encode_ms"]["median"] > 0 and im["preprocess_ms"]["median"] > 0
    assert r["peak_rss_mb"] > 10


def test_prompts_differ_per_repetition_and_cache_is_not_reused(tiny_vlm):
    model, _, _ = tiny_vlm
    a, b = bench.synthetic_prompt(64, 5000, 0), bench.synthetic_prompt(64, 5000, 1)
    assert len(a) == 64 and a != b and a == bench.synthetic_prompt(64, 5000, 0)
    cfg = {"model": str(model), "mmproj": None, "images": [], "n_prompt": 16, "n_gen": 2, "reps": 2, "warmup": 1,
           "threads": 1, "dtype": "float32", "device": None, "ctx_size": None}
    r = bench.run_engine("ocula", cfg)  # raises if the prefix cache served any prompt token
    assert len(r["pp"]["tps"]["values"]) == 2


def _check_turns(r: dict, reps: int) -> None:
    for key in bench.TURN_KEYS:
        assert set(r[key]) == {"min", "median", "max", "values"} and len(r[key]["values"]) == reps, key
    turns = r["chat"]["turns"]
    assert len(turns) == reps
    for t in turns:
        first, second = t["prompt_tokens"]
        assert t["cached_tokens"][0] == 0  # every repetition starts with cold caches
        assert t["images_encoded"] == [1, 0]  # turn 2 took the image from the cache
        # ... and the first turn's prompt (image included) from the KV cache; its last token may merge
        # with the start of the re-sent answer when tokenized again
        assert first - 1 <= t["cached_tokens"][1] < second


def test_two_turn_chat_reuses_image_and_prefix(tiny_vlm, capsys):
    model, mmproj, img = tiny_vlm
    rc = main(["bench", "-m", str(model), "--mmproj", str(mmproj), "--image", str(img), "-p", "0", "-n", "0",
               "--reps", "1", "--warmup", "0", "--chat-reps", "2", "-t", "1", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ocula"]
    _check_turns(r, 2)
    assert r["chat"]["questions"] and r["chat"]["answer_tokens"] > 0
    assert main(["bench", "-m", str(model), "--mmproj", str(mmproj), "--image", str(img), "-p", "0", "-n", "0",
                 "--reps", "1", "--warmup", "0", "--chat-reps", "1", "-t", "1"]) == 0
    assert "turn 2 / turn 1" in capsys.readouterr().out


def test_two_turn_chat_llamacpp_reuses_its_kv_prefix(tiny_vlm):
    pytest.importorskip("llama_cpp")
    model, mmproj, img = tiny_vlm
    cfg = {"model": str(model), "mmproj": str(mmproj), "images": [str(img)], "n_prompt": 0, "n_gen": 0, "reps": 1,
           "warmup": 0, "threads": 1, "dtype": "float32", "device": None, "ctx_size": None, "chat_reps": 1}
    _check_turns(bench.run_engine("llama.cpp", cfg), 1)


def _result(encode_ms, pp, tg, rss):
    return {"images": [{"encode_ms": {"median": e, "min": e / 2}} for e in encode_ms],
            "pp": {"tps": {"median": pp, "max": 2 * pp}}, "tg": {"tps": {"median": tg, "max": tg}}, "peak_rss_mb": rss}


def test_ratios_are_ocula_over_llamacpp():
    r = bench.compute_ratios(_result([100, 300], 300.0, 10.0, 1100.0), _result([200, 200], 200.0, 20.0, 1000.0))
    assert r == {"image_encode_time": 1.0, "pp_tps": 1.5, "tg_tps": 0.5, "peak_rss": 1.1}
    r = bench.compute_ratios({"images": [], "peak_rss_mb": 5.0}, {"images": [], "peak_rss_mb": 0})
    assert r == {"image_encode_time": None, "pp_tps": None, "tg_tps": None, "peak_rss": None}
    assert set(r) == set(bench.RATIO_KEYS)
    best = bench.compute_ratios(_result([100], 300.0, 10.0, 1.0), _result([400], 200.0, 20.0, 1.0), best=True)
    assert best == {"image_encode_time": 0.25, "pp_tps": 1.5, "tg_tps": 0.5, "peak_rss": 1.0}


def test_compare_runs_each_engine_separately_and_reports_ratios(tiny_vlm, monkeypatch, capsys):
    model, _, _ = tiny_vlm
    calls = []

    def fake(engine, cfg):
        calls.append(engine)
        return _result([50.0], 100.0, 10.0, 500.0) if engine == "ocula" else _result([100.0], 50.0, 20.0, 400.0)

    monkeypatch.setattr(bench, "run_subprocess", fake)
    assert main(["bench", "-m", str(model), "--compare", "llama.cpp", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == ["ocula", "llama.cpp"]
    assert report["ratios"] == {"image_encode_time": 0.5, "pp_tps": 2.0, "tg_tps": 0.5, "peak_rss": 1.25}
    assert set(report["ratios_best"]) == set(bench.RATIO_KEYS)
    assert main(["bench", "-m", str(model), "--compare", "llama.cpp"]) == 0
    assert "ocula / llama.cpp" in capsys.readouterr().out


def test_rounds_alternate_engines_and_pool_repetitions():
    a = {"load_ms": 10.0, "peak_rss_mb": 100.0, "pp": {"tokens": 8, "tps": bench.summary([1.0, 2.0])},
         "ttft_ms": bench.summary([5.0]), "images": [{"tokens": 4, "preprocess_ms": bench.summary([1.0]),
                                                    "encode_ms": bench.summary([10.0])}]}
    b = {**a, "load_ms": 30.0, "peak_rss_mb": 120.0, "pp": {"tokens": 8, "tps": bench.summary([4.0])},
         "images": [{"tokens": 4, "preprocess_ms": bench.summary([3.0]), "encode_ms": bench.summary([30.0])}]}
    m = bench.merge_runs([a, b])
    assert m["pp"]["tps"]["values"] == [1.0, 2.0, 4.0] and m["pp"]["tps"]["median"] == 2.0
    assert m["peak_rss_mb"] == 120.0 and m["load_ms"] == 20.0 and m["rounds"] == 2
    assert m["images"][0]["encode_ms"]["values"] == [10.0, 30.0]
    turns = {"ttft_first_turn_ms": bench.summary([100.0]), "ttft_second_turn_ms": bench.summary([5.0]),
             "second_turn_ttft": bench.summary([0.05]), "chat": {"turns": [{"cached_tokens": [0, 9]}]}}
    m = bench.merge_runs([{**a, **turns}, {**b, **turns}])
    assert m["ttft_second_turn_ms"]["values"] == [5.0, 5.0] and len(m["chat"]["turns"]) == 2


def test_summary():
    s = bench.summary([3.0, 1.0, 2.0])
    assert (s["min"], s["median"], s["max"]) == (1.0, 2.0, 3.0)
    assert bench.summary([])["median"] is None
