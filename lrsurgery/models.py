"""Resolve a model reference to an ``nn.Module`` offline-first, record where its weights came from, save it back.

References:
  ``timm:NAME``                 timm architecture; weights from ``weights=FILE``, else the hub cache, else
                                an error (``init="random"`` for a seeded fresh init)
  ``hf:ORG/NAME[@REVISION]``    transformers, from the hub cache (network only when not offline)
  ``DIR``                       a local model directory: transformers (config.json with ``model_type``)
                                or timm (config.json with ``architecture``, as ``save_model`` writes it)
Weights are read from safetensors, or with ``torch.load(weights_only=True)`` at most: never pickle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.errors import LrsurgeryError, ModelNotFoundError, OutputExistsError, ShapeMismatchError
from lrsurgery.format import file_sha256

_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.index.json"]


@dataclass
class BaseInfo:
    """Exactly which base an adapter was made on; stored in the adapter and the run directory."""

    ref: str
    library: str                     # "timm" | "transformers"
    source: str                      # "file" | "hub-cache" | "hub" | "local-dir" | "random-init"
    revision: str | None = None      # hub commit hash
    weights: str | None = None       # weights file given by the user
    weights_sha256: str | None = None
    num_classes: int | None = None   # head size requested at load time
    init_seed: int | None = None     # seed of a random init (reproducible base)
    head_reset: bool = False         # the head was re-initialized for num_classes

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}

    def load_kwargs(self) -> dict[str, Any]:
        """Arguments to ``load_model`` that rebuild this exact base."""
        return {"weights": self.weights, "init": "random" if self.source == "random-init" else "pretrained",
                "num_classes": self.num_classes, "seed": self.init_seed or 0}


def base_info(model: nn.Module) -> BaseInfo | None:
    """The BaseInfo that ``load_model`` attached, if any."""
    return getattr(model, "lrsurgery_base", None)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE ask for no network (read at call time)."""
    from huggingface_hub import constants
    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def load_model(ref: str, *, weights: str | os.PathLike | None = None, init: str = "pretrained",
               num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """Build the model named by ``ref`` and attach a ``BaseInfo`` as ``model.lrsurgery_base``.

    ``num_classes`` replaces the classification head (re-initialized, seeded by ``seed``).
    """
    ref = os.fspath(ref)
    if init not in ("pretrained", "random"):
        raise LrsurgeryError(f"init must be 'pretrained' or 'random', got {init!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if ref.startswith("timm:"):
            model, info = _load_timm(ref, ref[5:], weights, init, num_classes)
        elif ref.startswith("hf:"):
            model, info = _load_transformers(ref, _hub_dir(ref[3:]), num_classes, init)
        else:
            path = Path(ref)
            if path.suffix == ".safetensors" and path.is_file():
                raise ModelNotFoundError(f"{ref} is a plain weights file with no architecture: load it as "
                                         "timm:NAME with --weights FILE, or give a model directory")
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"cannot resolve model {ref!r}: expected timm:NAME, hf:ORG/NAME[@REV] "
                                         "or a local directory with config.json")
            cfg = _read_json(path / "config.json")
            ref = str(path.resolve())  # a run must find its base again from any working directory
            if "architecture" in cfg:
                model, info = _load_timm(ref, None, weights, init, num_classes, local_dir=path)
            else:
                model, info = _load_transformers(ref, (path, None, "local-dir"), num_classes, init)
    info.init_seed = seed if (info.source == "random-init" or info.head_reset) else None
    model.lrsurgery_base = info
    return model.eval()


def _load_timm(ref: str, name: str | None, weights, init: str, num_classes: int | None,
               local_dir: Path | None = None) -> tuple[nn.Module, BaseInfo]:
    import timm
    model_args: dict[str, Any] = {}
    if name and name.startswith("local-dir:"):
        local_dir, name = Path(name[len("local-dir:"):]), None
    if local_dir is not None:
        cfg = _read_json(local_dir / "config.json")
        name, model_args = cfg["architecture"], dict(cfg.get("model_args") or {})
        model_args.pop("num_classes", None)
        saved_classes = cfg.get("num_classes")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        raise ModelNotFoundError(f"timm has no architecture {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = dict(model_args)
    if local_dir is not None and saved_classes is not None:
        kwargs["num_classes"] = saved_classes
    with _quiet_timm_stats():
        model = timm.create_model(name, pretrained=False, **kwargs)
    info = BaseInfo(ref=ref, library="timm", source="random-init")
    if weights is not None:
        state = read_state_dict(weights)
        info.source, info.weights, info.weights_sha256 = "file", str(Path(weights).resolve()), file_sha256(weights)
    elif local_dir is not None and init == "pretrained":
        state, info.source = read_state_dict(_weights_file(local_dir)), "local-dir"
    elif init == "pretrained":
        state, info.source, info.revision = _timm_hub_cache(model, name)
    else:
        state = None
    if state is not None:
        load_checked(model, state, what=info.weights or ref)
    if num_classes is not None and num_classes != getattr(model, "num_classes", None):
        model.reset_classifier(num_classes)
        info.num_classes, info.head_reset = num_classes, True
    return model, info


@contextlib.contextmanager
def _quiet_timm_stats():
    """timm warns that a 1-channel model has RGB mean/std (and then uses their mean): expected here."""
    quiet = logging.getLogger("timm.data.model_config")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def _timm_hub_cache(model: nn.Module, name: str):
    from huggingface_hub import try_to_load_from_cache
    repo = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if repo:
        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str):
                revision = Path(hit).parent.name
                return read_state_dict(hit), "hub-cache", revision
    raise ModelNotFoundError(
        f"no pretrained weights for timm:{name} offline (looked in the hub cache for "
        f"{repo or 'a hub id'}/model.safetensors). Fix: pass --weights FILE (safetensors), use --init random, "
        f"or download once online: hf download {repo or name}")


def _hub_dir(spec: str) -> tuple[Path, str | None, str]:
    """hf:ORG/NAME[@REV] -> (local snapshot dir, commit hash, source); cache first, network if allowed."""
    from huggingface_hub import snapshot_download
    repo, _, revision = spec.partition("@")
    revision = revision or None
    try:
        path = snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=_HUB_FILES)
        source = "hub-cache"
    except Exception as cache_miss:
        if hub_offline():
            raise ModelNotFoundError(f"hf:{spec} is not in the local hub cache and HF_HUB_OFFLINE is set. "
                                     f"Fix: unset HF_HUB_OFFLINE to download it, or run "
                                     f"`hf download {repo}{' --revision ' + revision if revision else ''}` "
                                     f"where there is network ({type(cache_miss).__name__})")
        try:
            path = snapshot_download(repo, revision=revision, allow_patterns=_HUB_FILES)
            source = "hub"
        except Exception as e:
            raise ModelNotFoundError(f"could not find hf:{spec} in the hub cache nor download it ({e}). "
                                     "Check the name and revision, or pass a local model directory")
    return Path(path), Path(path).name, source


def _load_transformers(ref: str, where: tuple[Path, str | None, str], num_classes: int | None,
                       init: str) -> tuple[nn.Module, BaseInfo]:
    import transformers
    from transformers import AutoConfig
    path, revision, source = where
    config = AutoConfig.from_pretrained(path)
    info = BaseInfo(ref=ref, library="transformers", source=source, revision=revision, num_classes=num_classes)
    if num_classes is not None:
        auto = (transformers.AutoModelForImageClassification if hasattr(config, "image_size")
                else transformers.AutoModelForSequenceClassification)
        config.num_labels = num_classes
    else:
        arch = (getattr(config, "architectures", None) or [None])[0]
        auto = getattr(transformers, arch, None) if arch else None
        auto = auto or transformers.AutoModel
    if init == "random":
        info.source = "random-init"
        return (auto.from_config(config) if hasattr(auto, "from_config") else auto(config)), info
    try:
        model = auto.from_pretrained(path, config=config)
    except OSError as e:
        raise ModelNotFoundError(f"{ref}: no loadable weights in {path} ({e})")
    # A new classification head has no weights in the checkpoint: it is re-initialized.
    info.head_reset = num_classes is not None
    return model, info


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise ModelNotFoundError(f"{path}: not a readable safetensors file ({e})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelNotFoundError(f"{path}: refused to load ({type(e).__name__}); lrsurgery reads safetensors, or "
                                 "torch files with plain tensors only (weights_only=True) — convert it to safetensors")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelNotFoundError(f"{path} does not hold a state dict of tensors")
    return obj


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``state`` into ``model`` after checking key sets and every shape (nanoGPT's discipline)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ShapeMismatchError(f"{what} does not fit this architecture: missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]}; is it the right model name and config?")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ShapeMismatchError(f"{what}: tensor {k!r} has shape {list(v.shape)} but the model expects "
                                     f"{list(own[k].shape)}; is it the right model name and config?")
    model.load_state_dict(state, strict=True)


def _weights_file(directory: Path) -> Path:
    for fname in ("model.safetensors", "pytorch_model.bin"):
        if (directory / fname).is_file():
            return directory / fname
    raise ModelNotFoundError(f"{directory} has no model.safetensors")


def _read_json(path: Path) -> dict[str, Any]:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read {path}: {e}")


def save_model(model: nn.Module, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a plain model in its library's own layout, atomically.

    timm: ``OUT.safetensors`` (a state dict) or a directory (config.json + model.safetensors, loadable
    as ``timm:local-dir:OUT`` or by ``load_model(OUT)``); transformers: ``save_pretrained`` directory.
    """
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise LrsurgeryError("the model still has adapter layers: merge them (lrsurgery.merge) or save the adapter "
                             "with save_adapter; save_model writes plain models only")
    info = base_info(model)
    library = info.library if info else ("transformers" if hasattr(model, "save_pretrained") else "timm")
    if out.suffix == ".safetensors":
        from lrsurgery.format import atomic_write
        state = _unshared(model.state_dict())
        atomic_write(out, lambda tmp: save_file(state, str(tmp)))
        return out
    from lrsurgery.format import atomic_dir

    def fill(tmp: Path) -> None:
        if library == "timm":
            from timm.models import save_for_hf
            with _quiet_timm_stats():
                save_for_hf(model, tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp)
            _copy_tokenizer(info, tmp)
    atomic_dir(out, fill)
    return out


def _copy_tokenizer(info: BaseInfo | None, dest: Path) -> None:
    src = model_dir(info) if info else None
    if src is None:
        return
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and f.is_file():
            shutil.copy(f, dest / f.name)


def model_dir(info: BaseInfo) -> Path | None:
    """The local directory a base was loaded from (for its tokenizer and processor files)."""
    if info.ref.startswith("hf:"):
        return _hub_dir(info.ref[3:])[0]
    p = Path(info.ref)
    return p if p.is_dir() else None


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses aliased tensors: clone all but the first of each shared storage."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
        seen.add(ptr)
    return out


def input_config(model: nn.Module) -> dict[str, Any]:
    """Image input of a vision model: in_chans, image_size (H, W), mean, std (timm's data config)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = cfg.get("input_size") or (3, 224, 224)
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None):
        size = (getattr(patch.proj, "in_channels", size[0]), *patch.img_size)
    in_chans = int(size[0])

    def per_channel(v: tuple[float, ...]) -> tuple[float, ...]:
        # timm keeps RGB statistics for a 1-channel model; like timm, use their mean then.
        return v if len(v) in (1, in_chans) else (sum(v) / len(v),)
    return {"in_chans": in_chans, "image_size": (int(size[1]), int(size[2])),
            "mean": per_channel(tuple(cfg.get("mean", (0.5,)))), "std": per_channel(tuple(cfg.get("std", (0.5,))))}
