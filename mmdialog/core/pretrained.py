"""Reading pretrained base-model folders (LLM, BLIP-2, Stable Diffusion):
existence checks before heavy work, and partial loads (the vision half of a
BLIP-2 checkpoint without its 7B LM). The training-checkpoint format is
``core/checkpoint.py``."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from mmdialog.core.errors import ConfigError
from mmdialog.core.reading import check_file, read_json

REMOTE_CODE_HELP = ("mmdialog runs no code a model folder names unless you pass --trust-remote-code (Python: "
                    "trust_remote_code=True), and you should only for a source you trust")


@contextlib.contextmanager
def no_remote_code(what: str) -> Iterator[None]:
    """Turn transformers' refusal of a folder's own code (``auto_map`` naming a
    ``.py`` file, with ``trust_remote_code=False``) into one line saying why."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(f"{what} asks to run its own Python code (a custom class in its auto_map); "
                          f"{REMOTE_CODE_HELP}") from None


def require_folder(path: str | Path, files: tuple[str, ...] | list[str], what: str,
                   expected: str = "a save_pretrained() folder of that model") -> Path:
    """Fail with one line if ``path`` is not a folder holding all of ``files``
    (checked before loading); ``expected`` says what the folder should be."""
    p = Path(path).expanduser()
    if not p.is_dir():
        where = "is a file, not a folder" if p.exists() else "does not exist"
        raise ConfigError(f"{what}: folder '{p}' {where}; give {expected}")
    missing = [f for f in files if not (p / f).exists()]
    if missing:
        raise ConfigError(f"{what}: folder '{p}' is missing {', '.join(missing)}; it should be {expected}")
    return p


def resolve_folder(path: str, files: list[str], what: str) -> Path:
    """A local folder as is; a hub id through the Hugging Face cache (or a
    download where the network allows). Either way the files are checked."""
    if not is_local(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path)
        except Exception as e:  # offline, gated, or unknown repository
            raise ConfigError(f"{what}: '{path}' is not a local folder and could not be fetched "
                              f"({type(e).__name__}); download it and give the folder path") from None
    return require_folder(path, files, what)


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~"))


def weight_files(folder: Path, stem: str = "model") -> list[Path]:
    """The safetensors (or .bin) files of a folder, sharded or not."""
    for ext, index in ((".safetensors", f"{stem}.safetensors.index.json"), (".bin", "pytorch_model.bin.index.json")):
        if (folder / index).exists():
            weight_map = read_json(folder / index, "weight index", root=folder).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConfigError(f"weight index '{folder / index}' has no weight_map of file names")
            return [check_file(folder / s, "weight shard", root=folder) for s in sorted(set(weight_map.values()))]
        single = folder / (f"{stem}{ext}" if ext == ".safetensors" else "pytorch_model.bin")
        if single.exists():
            return [single]
    raise ConfigError(f"no weights in '{folder}': expected {stem}.safetensors (or its index)")


def load_prefixed(folder: Path, prefixes: dict[str, torch.nn.Module | torch.nn.Parameter]) -> None:
    """Load the tensors under each ``prefix.`` of a folder's weights into a module.

    Only matching tensors are read (safetensors loads lazily), so a BLIP-2
    checkpoint's language model is never materialised.
    """
    from safetensors import safe_open

    states: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    for p in prefixes:
                        if key == p or key.startswith(p + "."):
                            states[p][key[len(p) + 1:] if key != p else ""] = sf.get_tensor(key)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            for key, t in sd.items():
                for p in prefixes:
                    if key == p or key.startswith(p + "."):
                        states[p][key[len(p) + 1:] if key != p else ""] = t
    for p, target in prefixes.items():
        if not states[p]:
            raise ConfigError(f"checkpoint '{folder}' has no tensors under '{p}'")
        if isinstance(target, torch.nn.Parameter):
            with torch.no_grad():
                target.copy_(states[p][""])
        else:
            missing, unexpected = target.load_state_dict(states[p], strict=False)
            if missing:
                raise ConfigError(f"checkpoint '{folder}' lacks {len(missing)} tensors of '{p}' "
                                  f"(e.g. {missing[0]}); is it the right model?")
