"""Adapters on the Hugging Face Hub, offline: ``hf:`` references from a pre-populated cache, and ``push``.

The cache gets a fake adapter repo ``test-org/gpt2-lora`` made on the conftest's fake hub model
``tiny-org/tiny-gpt2``: commit OLD (tag v1) and commit NEW (main), two different adapters. Pushes
never reach the network: ``--dry-run`` writes files, and the upload test records HfApi calls.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery import lineage
from lrsurgery.cli import main
from lrsurgery.errors import LrsurgeryError
from lrsurgery.hub import HubRef, last_eval, model_card, parse_ref, plan_push, resolve_file, upload
from lrsurgery.run import ADAPTER, METRICS, create_run, train_run
from lrsurgery.train.loop import TrainConfig

REPO = "test-org/gpt2-lora"
OLD = "1111111111111111111111111111111111111111"
NEW = "2222222222222222222222222222222222222222"
BASE = "hf:tiny-org/tiny-gpt2"
GPT2_MODULES = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]


def cli(*args: Any) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def write_gpt2_adapters(paths: dict[int, Path]) -> None:
    """Rank-4 LoRAs on the fake hub GPT-2, B seeded per file (non-zero, so they change the outputs)."""
    model = lrsurgery.load_model(BASE)
    lrsurgery.inject(model, rank=4, alpha=8)
    for seed, path in paths.items():
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in sorted(lrsurgery.lora_modules(model).items()):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        fmt.write(path, lrsurgery.adapter_from_model(model))  # written before B changes again


def put_in_cache(cache: Path, repo: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ()) -> Path:
    """Lay files out as huggingface_hub does: models--ORG--NAME/{refs/REF, snapshots/COMMIT/FILE}."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, src in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snapshot / name)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def adapter_repo(hub_cache: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``test-org/gpt2-lora`` in the hub cache: OLD (tag v1) = seed 1, NEW (main) = seed 2 (+ extra/other)."""
    root = tmp_path_factory.mktemp("adapters")
    old, new = root / "old.safetensors", root / "new.safetensors"
    write_gpt2_adapters({1: old, 2: new})
    put_in_cache(hub_cache["cache"], REPO, OLD, {"adapter.safetensors": old}, refs=("v1",))
    put_in_cache(hub_cache["cache"], REPO, NEW, {"adapter.safetensors": new, "extra/other.safetensors": old},
                 refs=("main",))
    return {"old": old, "new": new}


def same_tensors(a: fmt.Adapter, b: fmt.Adapter) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- references ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, parsed", [
    ("hf:org/name", HubRef("org/name", None, "adapter.safetensors")),
    ("hf:org/name@main", HubRef("org/name", "main", "adapter.safetensors")),
    (f"hf:org/name@{OLD}:sub/a.safetensors", HubRef("org/name", OLD, "sub/a.safetensors")),
    ("hf:org/name:a.safetensors", HubRef("org/name", None, "a.safetensors")),
])
def test_parse_hub_reference(ref: str, parsed: HubRef) -> None:
    assert parse_ref(ref) == parsed
    assert parse_ref(str(parsed)) == parsed  # str() round-trips, omitting the default file


@pytest.mark.parametrize("ref", ["hf:org/name@", "hf:org/name:", "hf:a/b/c", "hf:bad name/x", "hf:org/n:../x"])
def test_malformed_hub_reference_is_refused(ref: str) -> None:
    with pytest.raises(LrsurgeryError, match="hf:ORG/NAME|invalid hub repo id"):
        parse_ref(ref)


@pytest.mark.parametrize("rev, expected", [("", "new"), ("@main", "new"), (f"@{NEW}", "new"), (f"@{OLD}", "old"),
                                           ("@v1", "old"), (":extra/other.safetensors", "old")])
def test_load_adapter_from_hub_cache(adapter_repo: dict[str, Path], hub_cache, rev: str, expected: str) -> None:
    adapter = lrsurgery.load_adapter(f"hf:{REPO}{rev}")
    assert same_tensors(adapter, fmt.read(adapter_repo[expected]))
    assert not same_tensors(fmt.read(adapter_repo["old"]), fmt.read(adapter_repo["new"]))
    commit = OLD if expected == "old" and not rev.startswith(":") else NEW
    filename = rev[1:] if rev.startswith(":") else "adapter.safetensors"
    assert adapter.source == f"hf:{REPO}@{commit}:{filename}"  # pinned to what was read
    assert adapter.path == hub_cache["cache"] / "models--test-org--gpt2-lora" / "snapshots" / commit / filename
    assert sorted(adapter.modules) == GPT2_MODULES


def test_hub_adapter_applies_to_hub_base_like_the_local_file(adapter_repo: dict[str, Path]) -> None:
    base = lrsurgery.load_model(BASE)
    reference = logits(base)
    from_hub, from_file = lrsurgery.load_model(BASE), lrsurgery.load_model(BASE)
    lrsurgery.apply_adapter(from_hub, f"hf:{REPO}")  # every adapter path argument takes hf: references
    lrsurgery.apply_adapter(from_file, adapter_repo["new"])
    hub_out, file_out = logits(from_hub), logits(from_file)
    assert torch.equal(hub_out, file_out)
    change = (hub_out - reference).abs().max().item()
    print(f"\n[hub] max |logit change| from the hub adapter = {change:.4f}")
    assert change > 1e-2  # the adapter really changes the model


def test_cli_merge_hub_base_and_hub_adapter_offline(adapter_repo: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = cli("merge", BASE, f"hf:{REPO}", "-o", tmp_path / "from-hub", "--json")
    assert code == 0, err
    assert json.loads(out) == {"merged": str(tmp_path / "from-hub")}
    code, _, err = cli("merge", BASE, adapter_repo["new"], "-o", tmp_path / "from-file")
    assert code == 0, err
    a = load_file(str(tmp_path / "from-hub" / "model.safetensors"))
    b = load_file(str(tmp_path / "from-file" / "model.safetensors"))
    base = load_file(str(resolve_file(HubRef("tiny-org/tiny-gpt2", None, "model.safetensors")).path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(a[key], base[key])  # the merge changed the adapted weights


def test_show_combine_and_peft_export_take_hub_references(adapter_repo: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = cli("show", f"hf:{REPO}", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["id"] == lineage.adapter_id(fmt.read(adapter_repo["new"]))
    code, _, err = cli("combine", f"hf:{REPO}", str(adapter_repo["new"]), "--mode", "mean", "-o", tmp_path / "c.safetensors")
    assert code == 0, err
    code, _, err = cli("convert", "--to", "peft", f"hf:{REPO}", "-o", tmp_path / "peft")
    assert code == 0, err
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_cache_first_never_calls_the_network_when_cached(adapter_repo, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real, calls = huggingface_hub.hf_hub_download, []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):
            import httpx2
            from huggingface_hub.errors import RevisionNotFoundError
            raise RevisionNotFoundError("Revision Not Found", response=httpx2.Response(
                404, request=httpx2.Request("GET", "https://huggingface.co")))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    assert resolve_file(f"hf:{REPO}").source == "hub-cache" and calls == [True]
    with pytest.raises(LrsurgeryError, match=f"{REPO} has no revision 'nope'; give a branch, tag or commit hash"):
        resolve_file(f"hf:{REPO}@nope")
    assert calls == [True, True, False]  # cache first, then the hub


# --- errors offline --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, message", [
    ("hf:nobody/nothing", "nobody/nothing is not in the local hub cache .* and HF_HUB_OFFLINE is set. Fix: unset "
                          "HF_HUB_OFFLINE to download it, or run `hf download nobody/nothing adapter.safetensors`"),
    (f"hf:{REPO}@dev", f"revision 'dev' of {REPO} is not in the local hub cache \\(cached: main, v1, {OLD}, {NEW}\\)"
                       f".*`hf download {REPO} adapter.safetensors --revision dev`"),
    (f"hf:{REPO}@{'f' * 40}", f"revision '{'f' * 40}' of {REPO} is not in the local hub cache"),
    (f"hf:{REPO}:nope.safetensors", f"the cached snapshot {REPO}@{NEW} has no nope.safetensors \\(cached files: "
                                    "adapter.safetensors, extra/other.safetensors\\). Fix: unset HF_HUB_OFFLINE"),
    # a model repo is no adapter repo: it has no adapter.safetensors
    (BASE, "the cached snapshot tiny-org/tiny-gpt2@0123456789abcdef0123456789abcdef01234567 has no "
           "adapter.safetensors \\(cached files: config.json, model.safetensors\\). Fix: name the adapter file: "
           "hf:tiny-org/tiny-gpt2@main:FILE, or unset HF_HUB_OFFLINE"),
])
def test_missing_hub_adapter_offline_says_what_and_how(adapter_repo, ref: str, message: str) -> None:
    with pytest.raises(LrsurgeryError, match=message):
        lrsurgery.load_adapter(ref)


def test_hub_knows_file_is_absent_offline(adapter_repo, hub_cache) -> None:
    marker = hub_cache["cache"] / f"models--{REPO.replace('/', '--')}" / ".no_exist" / OLD / "lora.safetensors"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()  # huggingface_hub records a file the hub said does not exist
    with pytest.raises(LrsurgeryError, match=f"{REPO}@{OLD} has no lora.safetensors \\(the hub said so"):
        lrsurgery.load_adapter(f"hf:{REPO}@v1:lora.safetensors")


def test_cli_merge_missing_hub_adapter_is_one_error_line(adapter_repo, tmp_path: Path) -> None:
    code, out, err = cli("merge", BASE, "hf:nobody/nothing@v2", "-o", tmp_path / "m")
    assert code == 1 and out == "" and not (tmp_path / "m").exists()
    assert err.startswith("error: hf:nobody/nothing@v2 cannot be resolved offline: nobody/nothing is not in the "
                          "local hub cache") and err.count("\n") == 1


# --- push ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(digits_vit_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real tiny run: LoRA rank 4 on the 1-channel ViT, 5 AdamW steps on digits 5-9."""
    path = tmp_path_factory.mktemp("push") / "run"
    create_run(str(digits_vit_dir), path, rank=4, alpha=8)
    result = train_run(path, "digits:5-9", TrainConfig(steps=5, batch_size=16, progress=False))
    return path, result


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_of_a_run_has_base_method_ranks_recipe_and_final_metrics(trained_run) -> None:
    path, result = trained_run
    plan = plan_push(path, "me/vit-digits")
    card = plan.card
    print("\n" + card)
    # a local base has no hub id: no base_model
    assert front_matter(card) == {"library_name": "lrsurgery", "tags": ["lrsurgery", "lora"]}
    evals = [json.loads(ln) for ln in (path / METRICS).read_text().splitlines() if "eval_loss" in ln]
    final = evals[-1]
    assert last_eval(path / METRICS) == {"step": 5, "loss": final["eval_loss"], "accuracy": final["eval_accuracy"]}
    assert result.eval == {"loss": final["eval_loss"], "accuracy": final["eval_accuracy"]}
    assert f"| eval loss | {final['eval_loss']:.4f} |" in card
    assert f"| eval accuracy | {final['eval_accuracy']:.4f} |" in card
    assert "last eval record of metrics.jsonl, step 5" in card
    adapter = fmt.read(path / ADAPTER)
    assert f"| reference | `{adapter.meta['base']['ref']}` |" in card
    assert "| weights from | local-dir |" in card and "The base was a local directory" in card
    # 2 blocks × (qkv 96×32, proj 32×32, fc1 128×32, fc2 32×128) at rank 4
    assert "| method | lora |" in card and "| format | lrsurgery adapter v1 |" in card
    assert "| LoRA modules | 8 |" in card and "| rank | 4 |" in card and "| alpha | 8 |" in card
    assert "| scaling | alpha/r |" in card and "| parameters | 4,096 |" in card
    assert f"| file sha256 | `{fmt.file_sha256(path / ADAPTER)}` |" in card
    assert "| `blocks.N.attn.qkv` | lora | 2 | 4 | 96×32 | 1,024 |" in card
    assert "| `blocks.N.mlp.fc2` | lora | 2 | 4 | 32×128 | 1,280 |" in card
    assert "| 1 | `digits:5-9` | 5 | adamw | 0.001 | 16 | constant |" in card
    assert "rank 4, alpha 8.0, dropout 0.0, seed 0; targets: the family preset." in card
    assert "| base weights hashed | 8 (SHA-256 of each weight a LoRA module modifies) |" in card
    assert "lrsurgery merge PATH/TO/BASE hf:me/vit-digits -o merged" in card
    assert 'lrsurgery.apply_adapter(model, "hf:me/vit-digits")' in card
    assert plan.message == f"Upload lora adapter for {adapter.meta['base']['ref']} (lrsurgery {lrsurgery.__version__})"


def test_model_card_of_a_hub_based_adapter_names_base_model_and_revision(adapter_repo, hub_cache) -> None:
    adapter = fmt.read(adapter_repo["new"])
    card = model_card(adapter, "me/gpt2-lora", revision="v2")
    assert front_matter(card) == {"library_name": "lrsurgery", "base_model": "tiny-org/tiny-gpt2",
                                  "tags": ["lrsurgery", "lora"]}
    assert f"| revision | `{hub_cache['commit']}` |" in card and "| weights from | hub-cache |" in card
    assert "lrsurgery merge hf:tiny-org/tiny-gpt2 hf:me/gpt2-lora@v2 -o merged" in card
    assert 'model = lrsurgery.load_model("hf:tiny-org/tiny-gpt2")' in card
    assert "| `transformer.h.N.attn.c_attn` | lora | 2 | 4 | 96×32 | 1,024 |" in card
    assert "## Training" not in card and "## Results" not in card  # a bare file has no recipe or metrics


def test_push_dry_run_writes_the_upload_and_round_trips_through_the_cache(trained_run, tmp_path, hub_cache) -> None:
    path, _ = trained_run
    code, out, err = cli("push", path, "me/vit-digits", "--revision", "exp1", "--dry-run", tmp_path / "dry", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info == {"repo": "me/vit-digits", "revision": "exp1", "files": ["README.md", "adapter.safetensors"],
                    "commit_message": plan_push(path, "me/vit-digits").message, "dry_run": str(tmp_path / "dry")}
    assert sorted(p.name for p in (tmp_path / "dry").iterdir()) == ["README.md", "adapter.safetensors"]
    assert (tmp_path / "dry" / "adapter.safetensors").read_bytes() == (path / ADAPTER).read_bytes()
    assert (tmp_path / "dry" / "README.md").read_text() == plan_push(path, "me/vit-digits", revision="exp1").card

    code, _, err = cli("push", path, "me/vit-digits", "--dry-run", tmp_path / "dry")
    assert code == 1 and "README.md exists; pass --force" in err
    code, out, err = cli("push", path, "me/vit-digits", "-m", "retrain", "--dry-run", tmp_path / "dry", "--force")
    assert code == 0 and out.startswith(f"dry run: wrote README.md, adapter.safetensors to {tmp_path / 'dry'} "
                                        "(would push to me/vit-digits@main: 'retrain')"), err

    # what a push uploads is what `hf:` loads back
    put_in_cache(hub_cache["cache"], "me/vit-digits", "3" * 40,
                 {n: tmp_path / "dry" / n for n in ("README.md", "adapter.safetensors")}, refs=("exp1",))
    assert same_tensors(lrsurgery.load_adapter("hf:me/vit-digits@exp1"), fmt.read(path / ADAPTER))


@pytest.fixture
def online(monkeypatch):
    """Network allowed as far as lrsurgery can tell; HfApi calls are recorded instead of sent."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake_token")
    calls: list[tuple[str, tuple, dict]] = []

    def recorder(name: str, result: Any = None):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return method

    monkeypatch.setattr(HfApi, "create_repo", recorder("create_repo"))
    monkeypatch.setattr(HfApi, "create_branch", recorder("create_branch"))
    monkeypatch.setattr(HfApi, "create_commit", recorder("create_commit", types.SimpleNamespace(
        commit_url="https://huggingface.co/me/vit-digits/commit/abc123")))
    return calls


def test_push_uploads_card_and_adapter_in_one_commit(trained_run, online) -> None:
    path, _ = trained_run
    code, out, err = cli("push", path, "me/vit-digits", "--revision", "exp1", "--private", "-m", "rank 4, 5 steps")
    assert code == 0, err
    assert out == "pushed README.md, adapter.safetensors to me/vit-digits@exp1 → " \
                  "https://huggingface.co/me/vit-digits/commit/abc123\n"
    assert [c[0] for c in online] == ["create_repo", "create_branch", "create_commit"]
    assert online[0][1:] == (("me/vit-digits",), {"private": True, "exist_ok": True})
    assert online[1][1:] == (("me/vit-digits",), {"branch": "exp1", "exist_ok": True})
    (repo, ops), kwargs = online[2][1], online[2][2]
    assert repo == "me/vit-digits" and kwargs == {"commit_message": "rank 4, 5 steps", "revision": "exp1"}
    assert [op.path_in_repo for op in ops] == ["README.md", "adapter.safetensors"]
    assert ops[0].path_or_fileobj == plan_push(path, "me/vit-digits", revision="exp1").card.encode()
    assert ops[1].path_or_fileobj == str(path / ADAPTER)


def test_push_to_main_of_a_public_repo_makes_no_branch(trained_run, online) -> None:
    path, _ = trained_run
    url = upload(plan_push(path / ADAPTER, "me/vit-digits"))
    assert url == "https://huggingface.co/me/vit-digits/commit/abc123"
    assert [c[0] for c in online] == ["create_repo", "create_commit"]
    assert online[0][2] == {"private": None, "exist_ok": True} and online[1][2]["revision"] is None


def test_push_offline_says_it_needs_the_network(trained_run, monkeypatch) -> None:
    from huggingface_hub import HfApi
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("push must not call the hub offline"))
    code, out, err = cli("push", trained_run[0], "me/vit-digits")
    assert code == 1 and out == ""
    assert err == ("error: push needs the network; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE), or use "
                   "--dry-run DIR to write the files locally\n")


def test_push_without_login_says_how_to_log_in(trained_run, online, monkeypatch) -> None:
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, _, err = cli("push", trained_run[0], "me/vit-digits")
    assert code == 1 and "not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN" in err
    assert online == []


def test_push_rejected_by_the_hub_names_the_fix(trained_run, online, monkeypatch) -> None:
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def forbidden(self, *args, **kwargs):
        raise HfHubHTTPError("403 Forbidden", response=httpx2.Response(
            403, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create")))
    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    with pytest.raises(LrsurgeryError, match="push to me/vit-digits failed \\(403\\): the token may not write to "
                                             "me/vit-digits: use a write token, or a namespace you own"):
        upload(plan_push(trained_run[0], "me/vit-digits"))


@pytest.mark.parametrize("repo_id", ["vit-digits", "a/b/c", "me/bad name", "me/-x"])
def test_push_refuses_an_invalid_repo_id(trained_run, repo_id: str, tmp_path: Path) -> None:
    code, out, err = cli("push", trained_run[0], repo_id, "--dry-run", tmp_path / "dry")
    assert code == 1 and err.startswith(f"error: invalid hub repo id {repo_id!r}: expected ORG/NAME")
    assert not (tmp_path / "dry").exists()


def test_push_a_directory_without_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrsurgeryError, match="is a directory without adapter.safetensors"):
        plan_push(tmp_path / "empty", "me/x")


def test_model_card_of_a_child_names_its_parents_and_stacks_them() -> None:
    from conftest import tiny_child_adapter
    from lrsurgery.hub import model_card
    card = model_card(tiny_child_adapter(), "org/child")
    assert "## Trained on top of" in card and "1. `dom.safetensors` (id `aaaaaaaaaaaa`, lora)" in card
    assert "lrsurgery stack PATH/TO/BASE dom.safetensors hf:org/child --merge -o merged" in card
    assert "lrsurgery merge" not in card  # merging a child alone is refused


def test_last_eval_skips_a_truncated_line_and_non_numbers(tmp_path: Path) -> None:
    from lrsurgery.hub import last_eval
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 5, "eval_loss": 0.5, "eval_accuracy": 0.9}\n{"step": 6, "eval_loss": null}\n{"step": 7, "lo')
    with pytest.warns(UserWarning, match="line 3 is not valid JSON"):
        assert last_eval(m) == {"step": 6}
