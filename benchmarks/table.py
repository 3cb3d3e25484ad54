"""Render benchmarks/results/*.json (written by benchmarks/run.py) as the Markdown tables of README.md.

    python benchmarks/table.py [results-dir]            # print
    python benchmarks/table.py --readme                  # rewrite the results section of README.md
    python benchmarks/table.py --readme results/NAME     # ... the section of a machine's folder
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def med(s) -> float | None:
    return None if not s else s.get("median")


def f(x, digits=1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def ratio(a, b, digits=2) -> str:
    return "–" if a is None or b is None or not b else f"**{a / b:.{digits}f}×**"


def wait(name: str, r: dict | None = None) -> str:
    """The OpenMP wait policy both engines ran with: recorded since it was added to the JSON; before,
    PASSIVE came from --env (`-passive` rows) or from ocula/__init__.py (commits from dce34e5 on)."""
    if r is not None and r.get("ocula", {}).get("gomp_spincount") and not r["ocula"].get("omp_wait_policy"):
        return f"spin {r['ocula']['gomp_spincount']}"
    if r is not None and "omp_wait_policy" in r.get("ocula", {}):
        return (r["ocula"]["omp_wait_policy"] or "active (default)").lower()
    if name.endswith("-passive"):
        return "passive"
    commit = ((r or {}).get("ocula", {}).get("source") or {}).get("commit")
    return "active (default)" if commit in ("21c141b", "8e36b0f") else "passive (ocula default)"


def dtype(r: dict) -> str:
    return {"float32": "f32", "bfloat16": "bf16"}.get(r["config"].get("dtype") or "float32", "?")


def best(r: dict, key: str) -> str:
    v = (r.get("ratios_best") or {}).get(key)
    return "–" if v is None else f"{v:.2f}×"


def src(r: dict) -> str:
    s = r["ocula"].get("source") or {}
    if not s:
        return "source not recorded"
    unc = s.get("uncommitted") or {}
    unc = unc if isinstance(unc, dict) else {k: "?" for k in unc}
    dirty = ", ".join(f"{Path(k).name}@{v}" for k, v in unc.items() if "quant" in k)
    return f"commit {s.get('commit')}" + (f" + uncommitted {dirty}" if dirty else "")


def preset_of(r: dict) -> str:
    name = Path(r["config"]["model"]).name
    return name.rsplit("-", 1)[0]


def quant_of(r: dict) -> str:
    return Path(r["config"]["model"]).stem.rsplit("-", 1)[1]


def render(results_dir: Path) -> str:
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"),
                                                                 key=lambda p: ("passive" not in p.stem, p.stem))}
    text = [(k, r) for k, r in reports.items() if r["config"]["n_prompt"] > 0]
    imgs = [(k, r) for k, r in reports.items() if r["config"]["images"]]
    chats = [(k, r) for k, r in imgs if "ttft_second_turn_ms" in r["ocula"] and "ttft_second_turn_ms" in r["llama.cpp"]]
    imgs = [(k, r) for k, r in imgs if (k, r) not in chats]  # chat rows: no warm-up, so only their TTFTs count
    out = []
    if text:
        out.append("| row | OMP wait | ocula dtype | model | quant | pp t/s ocula / llama.cpp (median) | pp ratio median (best) "
                   "| tg t/s ocula / llama.cpp (median) | tg ratio median (best) "
                   "| TTFT ms ocula / llama.cpp | peak RSS MiB ocula / llama.cpp | RSS ratio |")
        out.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, r in text:
            o, l = r["ocula"], r["llama.cpp"]
            c = r["config"]
            out.append(
                f"| `{k}` | {wait(k, r)} | {dtype(r)} | {preset_of(r)} | {quant_of(r)} "
                f"| pp{c['n_prompt']}: {f(med(o['pp']['tps']), 2)} / {f(med(l['pp']['tps']), 2)} "
                f"| {ratio(med(o['pp']['tps']), med(l['pp']['tps']))} ({best(r, 'pp_tps')}) "
                f"| tg{c['n_gen']}: {f(med(o.get('tg', {}).get('tps')), 2)} / {f(med(l.get('tg', {}).get('tps')), 2)} "
                f"| {ratio(med(o.get('tg', {}).get('tps')), med(l.get('tg', {}).get('tps')))} ({best(r, 'tg_tps')}) "
                f"| {f(med(o['ttft_ms']), 0)} / {f(med(l['ttft_ms']), 0)} "
                f"| {f(o['peak_rss_mb'], 0)} / {f(l['peak_rss_mb'], 0)} | {ratio(o['peak_rss_mb'], l['peak_rss_mb'])} |")
        out.append("")
    if imgs:
        out.append("| row | OMP wait | ocula dtype | model (F16 mmproj) | image | tokens ocula / llama.cpp | preprocess ms ocula / llama.cpp "
                   "| encode ms ocula / llama.cpp (median) | encode-time ratio median (best) "
                   "| ms per token ocula / llama.cpp "
                   "| peak RSS MiB ocula / llama.cpp | RSS ratio |")
        out.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, r in imgs:
            o, l = r["ocula"], r["llama.cpp"]
            for io, il in zip(o["images"], l["images"]):
                eo, el = med(io["encode_ms"]), med(il["encode_ms"])
                out.append(
                    f"| `{k}` | {wait(k, r)} | {dtype(r)} | {preset_of(r)} | {io['width']}×{io['height']} | {io['tokens']} / {il['tokens']} "
                    f"| {f(med(io['preprocess_ms']), 0)} / {f(med(il['preprocess_ms']), 0)} "
                    f"| {f(eo, 0)} / {f(el, 0)} | {ratio(eo, el)} ({ratio(io['encode_ms']['min'], il['encode_ms']['min'])}) "
                    f"| {f(eo / io['tokens'] if eo and io['tokens'] else None, 2)} / "
                    f"{f(el / il['tokens'] if el and il['tokens'] else None, 2)} "
                    f"| {f(o['peak_rss_mb'], 0)} / {f(l['peak_rss_mb'], 0)} | {ratio(o['peak_rss_mb'], l['peak_rss_mb'])} |")
        out.append("")
    if chats:
        out.append("| row | ocula dtype | model | turn 1 TTFT ms ocula / llama.cpp | turn 2 TTFT ms ocula / llama.cpp "
                   "| turn 2 / turn 1 ocula (llama.cpp) | turn 2 prompt tokens reused (ocula) | images encoded in turn 2 |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|")
        for k, r in chats:
            o, l = r["ocula"], r["llama.cpp"]
            t = o["chat"]["turns"][0]
            out.append(
                f"| `{k}` | {dtype(r)} | {preset_of(r)} "
                f"| {f(med(o['ttft_first_turn_ms']), 0)} / {f(med(l['ttft_first_turn_ms']), 0)} "
                f"| {f(med(o['ttft_second_turn_ms']), 0)} / {f(med(l['ttft_second_turn_ms']), 0)} "
                f"| **{f(med(o['second_turn_ttft']), 3)}×** ({f(med(l['second_turn_ttft']), 3)}×) "
                f"| {t['cached_tokens'][1]} of {t['prompt_tokens'][1]} | {t['images_encoded'][1]} |")
        out.append("")
    out.append("Commands (run from the repository root; `ocula synth` writes the files first):\n")
    for k, r in reports.items():
        out.append(f"- `{k}`: `{r.get('synth_command', '')}` then `{r.get('command', '')}` "
                   f"(load average after: {' '.join(r.get('loadavg_after', []))}; ocula {src(r)})")
    return "\n".join(out)


BEGIN, END = "<!-- results:begin (benchmarks/table.py --readme) -->", "<!-- results:end -->"


def markers(results_dir: Path) -> tuple[str, str]:
    """README.md's markers around the tables of `results_dir`: the plain pair for results/, one with
    the folder's name for a machine's folder (results/2026-12-03-zen4-avx2: `--readme` with that path)."""
    if results_dir.resolve() == (HERE / "results").resolve():
        return BEGIN, END
    name = results_dir.name
    return (f"<!-- results:begin {name} (benchmarks/table.py --readme results/{name}) -->",
            f"<!-- results:end {name} -->")


def update_readme(results_dir: Path, readme: Path = HERE / "README.md") -> None:
    """Replace the text between the results markers of README.md with the rendered tables."""
    begin, end = markers(results_dir)
    text = readme.read_text()
    if begin not in text:
        raise SystemExit(f"README.md has no marker {begin}")
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{begin}\n{render(results_dir)}\n{end}{tail}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--readme"]
    results = (Path(args[0]) if Path(args[0]).is_absolute() or Path(args[0]).exists() else HERE / args[0]) \
        if args else HERE / "results"
    if "--readme" in sys.argv:
        update_readme(results)
    else:
        print(render(results))
