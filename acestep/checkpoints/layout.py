"""Find the DiT-side checkpoint folders a user points at: the official layout or a diffusers repo.

Official: ``<root>/acestep-v15-{turbo,base,sft}/`` (config.json, model.safetensors,
silence_latent.pt) beside ``<root>/vae/`` and ``<root>/Qwen3-Embedding-0.6B/``.
Diffusers: a folder with ``model_index.json`` and one sub-folder per pipeline component.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
VAE_DIR = "vae"
OFFICIAL_DIT_FILES = ("config.json", "model.safetensors", "silence_latent.pt")
DIFFUSERS_COMPONENTS = ("transformer", "condition_encoder", "audio_tokenizer", "audio_token_detokenizer", "vae",
                        "text_encoder", "tokenizer")


@dataclass(frozen=True)
class DiTCheckpoint:
    """Where each DiT-side part lives on disk."""

    layout: str  # "official" | "diffusers"
    dit_dir: Path
    vae_dir: Path
    text_encoder_dir: Path
    tokenizer_dir: Path

    @property
    def name(self) -> str:
        return self.dit_dir.name


def _candidates(project_root: Optional[str | Path], config_path: str | Path) -> List[Path]:
    config_path = Path(config_path)
    if config_path.is_absolute() or project_root is None:
        return [config_path]
    root = Path(project_root)
    return [root / "checkpoints" / config_path, root / config_path]


def resolve_dit_checkpoint(project_root: Optional[str | Path], config_path: str | Path) -> DiTCheckpoint:
    """Resolve ``config_path`` (a DiT folder name or path) under ``project_root``.

    ``project_root`` may be the project folder (holding ``checkpoints/``) or the checkpoints
    folder itself; ``config_path`` may also be an absolute path."""
    tried = _candidates(project_root, config_path)
    for folder in tried:
        if (folder / "model_index.json").is_file():
            return _diffusers_layout(folder)
        if (folder / "config.json").is_file():
            return _official_layout(folder)
    raise FileNotFoundError(
        f"config_path={str(config_path)!r}: no DiT checkpoint found (looked for config.json or model_index.json in "
        + ", ".join(str(p) for p in tried) + ")"
    )


def resolve_lm_dir(checkpoint_dir: str | Path, name: str) -> Path:
    """The 5 Hz LM folder ``name`` under ``checkpoint_dir``; the error names the LM folders there."""
    from acestep.lm.constants import LM_DIR_PREFIX

    root = Path(checkpoint_dir)
    path = root / name
    if (path / "config.json").is_file():
        return path
    found = sorted(p.name for p in root.iterdir() if p.name.startswith(LM_DIR_PREFIX)) if root.is_dir() else []
    raise FileNotFoundError(f"5 Hz LM folder {path} not found; LM folders in {root}: {', '.join(found) or 'none'}")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _official_layout(dit_dir: Path) -> DiTCheckpoint:
    for name in OFFICIAL_DIT_FILES:
        _require(dit_dir / name, f"official DiT file {name}")
    root = dit_dir.parent
    text_encoder = _require(root / TEXT_ENCODER_DIR, "text encoder folder")
    return DiTCheckpoint("official", dit_dir, _require(root / VAE_DIR, "VAE folder"), text_encoder, text_encoder)


def _diffusers_layout(folder: Path) -> DiTCheckpoint:
    for name in DIFFUSERS_COMPONENTS:
        _require(folder / name, f"diffusers component {name}")
    return DiTCheckpoint("diffusers", folder, folder / "vae", folder / "text_encoder", folder / "tokenizer")
