"""Print every fixture case's parity figures against its HF reference (a table for notes and reviews).

    python scripts/parity_report.py            # ../shared/fixtures, or $OCULA_FIXTURES
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from parity import manifest, run_case  # noqa: E402

COLUMNS = ["case", "prompt_ids_equal", "pixel_max_abs", "feature_rel_err", "deepstack_rel_err",
           "logits_max_abs", "argmax_equal", "greedy_prefix", "greedy_checkable"]


def fmt(v) -> str:
    return f"{v:.2e}" if isinstance(v, float) else ("-" if v is None else str(v))


def main() -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for case in manifest()["cases"]:
        fig = run_case(case)
        print("| " + " | ".join(fmt(fig.get(c)) for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
