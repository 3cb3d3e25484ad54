"""`-hf ORG/REPO[:QUANT]`: pick a GGUF (and its mmproj) from a Hugging Face Hub repo, as llama.cpp's `-hf` does."""
from __future__ import annotations

import re

from ocula.errors import OculaError

# When no quant is named: the usual default, then progressively larger / smaller files.
QUANT_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "BF16", "F16", "F32")
MMPROJ_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")


class HubError(OculaError):
    pass


def parse_spec(spec: str) -> tuple[str, str | None]:
    repo, _, quant = spec.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise HubError(f"-hf expects ORG/REPO[:QUANT], got {spec!r}")
    return repo, (quant or None)


QUANT_NAME = re.compile(r"(?<![A-Z0-9])(I?Q\d_K_[SMLX]+|IQ\d_[A-Z]+|I?Q\d_K|Q\d_\d|TQ\d_\d|MXFP4|BF16|F16|F32)(?![A-Z0-9])")


def file_quant(filename: str) -> str | None:
    """The quant type named in a GGUF file name (Q4_K_M, Q8_0, F16, ...), or None."""
    names = QUANT_NAME.findall(filename.rsplit("/", 1)[-1].upper().replace(".GGUF", ""))
    return max(names, key=len) if names else None


def _has_quant(filename: str, quant: str) -> bool:
    return file_quant(filename) == quant.upper()


def choose_files(files: list[str], quant: str | None = None) -> tuple[str, str | None]:
    """From a repo's file list, the model GGUF to download and its mmproj (or None).

    Split models (`-00001-of-0000N.gguf`) are chosen by their first part.
    """
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    mmprojs = [f for f in ggufs if "mmproj" in f.rsplit("/", 1)[-1].lower()]
    models = [f for f in ggufs if f not in mmprojs and not re.search(r"-0000[2-9]-of-|-000[1-9]\d-of-", f)]
    if not models:
        raise HubError("the repository has no model .gguf file")
    if quant:
        hits = [f for f in models if _has_quant(f, quant)]
        if not hits:
            raise HubError(
                f"no .gguf with quant {quant!r} in the repository; available: {', '.join(sorted(models))}"
            )
        model = sorted(hits, key=len)[0]
    else:
        model = next((sorted(h, key=len)[0] for q in QUANT_PREFERENCE if (h := [f for f in models if _has_quant(f, q)])),
                     sorted(models)[0])
    mmproj = None
    if mmprojs:
        mmproj = next((sorted(h, key=len)[0] for q in MMPROJ_PREFERENCE if (h := [f for f in mmprojs if _has_quant(f, q)])),
                      sorted(mmprojs)[0])
    return model, mmproj


def download(spec: str) -> tuple[str, str | None]:
    """Fetch the chosen files into the Hugging Face cache; return local paths (model, mmproj)."""
    try:
        import huggingface_hub as hub
    except ImportError:
        raise HubError("-hf needs huggingface_hub: pip install 'ocula[hub]'") from None
    repo, quant = parse_spec(spec)
    try:
        files = hub.list_repo_files(repo)
        model, mmproj = choose_files(files, quant)
        parts = [model]
        m = re.search(r"-00001-of-(\d{5})\.gguf$", model)
        if m:
            parts = [model.replace("-00001-of-", f"-{i:05d}-of-") for i in range(1, int(m.group(1)) + 1)]
        paths = [hub.hf_hub_download(repo, p) for p in parts]
        mm_path = hub.hf_hub_download(repo, mmproj) if mmproj else None
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - network and hub errors all mean "could not fetch"
        raise HubError(f"could not fetch {spec!r} from the Hugging Face Hub: {e}") from None
    return paths[0], mm_path
