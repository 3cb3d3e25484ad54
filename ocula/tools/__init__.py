"""Tools around the engine: benchmarks (`ocula bench`), `ocula inspect`, Hugging Face hub downloads."""
