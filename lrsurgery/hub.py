"""Share adapters through the Hugging Face Hub: resolve ``hf:`` adapter references, push with a model card.

    hf:ORG/NAME                 adapter.safetensors at the tip of the repo's main branch
    hf:ORG/NAME@REV             at a branch, tag or commit hash (a 40-hex commit pins the exact file)
    hf:ORG/NAME[@REV]:FILE      another file of the repo, e.g. ``hf:org/adapters:vit/digits.safetensors``
Resolution is cache first (``local_files_only``), the network only when ``HF_HUB_OFFLINE`` is unset.
``push`` uploads an adapter file (or a run directory's) with a README.md card generated from its metadata.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lrsurgery import __version__
from lrsurgery import format as fmt
from lrsurgery.errors import LrsurgeryError, OutputExistsError
from lrsurgery.models import hub_offline

DEFAULT_FILE = "adapter.safetensors"
CARD = "README.md"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf:ORG/NAME[@REV][:FILE]`` adapter reference."""

    repo: str
    revision: str | None
    filename: str = DEFAULT_FILE

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.repo}{rev}" + (f":{self.filename}" if self.filename != DEFAULT_FILE else "")


@dataclass(frozen=True)
class HubFile:
    """Where a reference resolved to: the local cached file, the commit it belongs to, and how it was found."""

    ref: HubRef
    path: Path
    commit: str
    source: str  # "hub-cache" | "hub"

    @property
    def pinned(self) -> str:
        """The reference pinned to the commit that was read: it names these exact bytes forever."""
        return f"hf:{self.ref.repo}@{self.commit}:{self.ref.filename}"


def is_hub_ref(ref: str | os.PathLike) -> bool:
    return isinstance(ref, str) and ref.startswith("hf:")


def parse_ref(ref: str) -> HubRef:
    """Split ``hf:ORG/NAME[@REV][:FILE]``; repo ids and git refs never contain ':', so the first ':' is FILE's."""
    if not is_hub_ref(ref):
        raise LrsurgeryError(f"{ref!r} is not a hub reference; expected hf:ORG/NAME[@REV][:FILE]")
    spec, colon, filename = ref[3:].partition(":")
    repo, at, revision = spec.partition("@")
    if (at and not revision) or (colon and not filename) or filename.startswith("/") or ".." in filename.split("/"):
        raise LrsurgeryError(f"malformed hub reference {ref!r}: expected hf:ORG/NAME[@REV][:FILE], e.g. "
                             f"hf:org/name@main:{DEFAULT_FILE}")
    check_repo_id(repo, what=f"in {ref!r}", namespace=False)
    return HubRef(repo, revision or None, filename or DEFAULT_FILE)


def check_repo_id(repo: str, *, what: str = "", namespace: bool = True) -> None:
    """Refuse a repo id the hub would refuse, before any network call; ``namespace`` requires ORG/NAME."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo)
        if namespace and "/" not in repo:
            raise HFValidationError("it has no ORG/ part")
    except HFValidationError as e:
        raise LrsurgeryError(f"invalid hub repo id {repo!r}{' ' + what if what else ''}: expected ORG/NAME "
                             f"(letters, digits, '-', '_', '.'); {e}")


def resolve_file(ref: str | HubRef) -> HubFile:
    """The local path of a hub file: from the cache if it is there, else downloaded (unless offline)."""
    from huggingface_hub import hf_hub_download
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    try:
        path = hf_hub_download(ref.repo, ref.filename, revision=ref.revision, local_files_only=True)
        source = "hub-cache"
    except Exception:  # not (fully) in the cache: say why when offline, else ask the hub
        if hub_offline():
            raise LrsurgeryError(f"{ref} cannot be resolved offline: {_cache_diagnosis(ref)}")
        try:
            path, source = hf_hub_download(ref.repo, ref.filename, revision=ref.revision), "hub"
        except Exception as e:
            raise _download_error(ref, e) from e
    path = Path(path)
    # hub paths are snapshots/<commit>/<filename>: the commit is the directory above the file's parts
    commit = path.parents[len(PurePosixPath(ref.filename).parts) - 1].name
    return HubFile(ref, path, commit, source)


def _cache_dir(repo: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _cache_diagnosis(ref: HubRef) -> str:
    """What the local cache lacks for ``ref`` (repo, revision, or file), and the command that fetches it."""
    repo_dir = _cache_dir(ref.repo)
    rev = ref.revision or "main"
    fetch = f"`hf download {ref.repo} {ref.filename}{'' if rev == 'main' else ' --revision ' + rev}`"
    fix = f"unset HF_HUB_OFFLINE to download it, or run {fetch} where there is network"
    if not repo_dir.is_dir():
        return f"{ref.repo} is not in the local hub cache ({repo_dir.parent}) and HF_HUB_OFFLINE is set. Fix: {fix}"
    refs = repo_dir / "refs"
    commit = rev if _COMMIT.fullmatch(rev) else ((refs / rev).read_text().strip() if (refs / rev).is_file() else None)
    if commit is None or not (repo_dir / "snapshots" / commit).is_dir():
        cached = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
        cached += sorted(p.name for p in (repo_dir / "snapshots").glob("*"))
        return (f"revision {rev!r} of {ref.repo} is not in the local hub cache (cached: "
                f"{', '.join(cached) or 'nothing'}). Fix: {fix}, or name a cached revision: hf:{ref.repo}@REV")
    snapshot = repo_dir / "snapshots" / commit
    held = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    if (repo_dir / ".no_exist" / commit / ref.filename).exists():
        return (f"{ref.repo}@{commit} has no {ref.filename} (the hub said so when it was cached). Fix: name the "
                f"adapter file: hf:{ref.repo}@{rev}:FILE (cached files: {', '.join(held) or 'none'})")
    name_it = f"name the adapter file: hf:{ref.repo}@{rev}:FILE, or " if ref.filename == DEFAULT_FILE else ""
    return (f"the cached snapshot {ref.repo}@{commit} has no {ref.filename} (cached files: "
            f"{', '.join(held) or 'none'}). Fix: {name_it}{fix}")


def _download_error(ref: HubRef, e: Exception) -> LrsurgeryError:
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    if isinstance(e, RepositoryNotFoundError):
        return LrsurgeryError(f"{ref}: the hub has no repository {ref.repo}, or it is private or gated: check the "
                              "name, or log in with `hf auth login`")
    if isinstance(e, RevisionNotFoundError):
        return LrsurgeryError(f"{ref}: {ref.repo} has no revision {ref.revision!r}; give a branch, tag or commit hash")
    if isinstance(e, LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: test it first
        return LrsurgeryError(f"{ref} is not in the local hub cache and the hub could not be reached ({e}); "
                              "check the network, or set HF_HUB_OFFLINE=1 to use the cache only")
    if isinstance(e, EntryNotFoundError):
        return LrsurgeryError(f"{ref}: {ref.repo}@{ref.revision or 'main'} has no file {ref.filename}; name the "
                              f"adapter file: hf:{ref.repo}[@REV]:FILE")
    return LrsurgeryError(f"{ref}: download failed ({type(e).__name__}: {e})")


# --- push ------------------------------------------------------------------------------------------------

@dataclass
class PushPlan:
    """Everything one push uploads: the adapter file, its model card, where, and with which message."""

    repo_id: str
    revision: str | None
    adapter_path: Path
    card: str
    message: str

    @property
    def files(self) -> list[str]:
        return [CARD, DEFAULT_FILE]


def plan_push(source: str | os.PathLike, repo_id: str, *, revision: str | None = None,
              message: str | None = None) -> PushPlan:
    """Read (and so validate) the adapter of a file or run directory, and write its model card."""
    from lrsurgery.run import ADAPTER, METRICS, RECIPE  # the run layout; run.py sits above this module
    check_repo_id(repo_id)
    source = Path(source)
    recipe, final_eval = None, None
    if source.is_dir():
        path = source / ADAPTER
        if not path.is_file():
            raise LrsurgeryError(f"{source} is a directory without {ADAPTER}: give an adapter file or a run directory")
        if (source / RECIPE).is_file():
            try:
                recipe = json.loads((source / RECIPE).read_text())
            except ValueError as e:
                raise LrsurgeryError(f"{source / RECIPE} is not valid JSON ({e}); the run directory is damaged")
        final_eval = last_eval(source / METRICS)
    elif source.is_file():
        path = source
    else:
        raise LrsurgeryError(f"{source}: no such adapter file or run directory")
    adapter = fmt.read(path)
    card = model_card(adapter, repo_id, revision=revision, recipe=recipe, final_eval=final_eval,
                      file_sha256=fmt.file_sha256(path))
    message = message or (f"Upload {adapter.meta.get('method', 'lora')} adapter for "
                          f"{adapter.meta['base'].get('ref')} (lrsurgery {__version__})")
    return PushPlan(repo_id, revision, path, card, message)


def last_eval(metrics: Path) -> dict[str, float] | None:
    """The last evaluation record of a metrics.jsonl, without its ``eval_`` prefixes."""
    if not metrics.is_file():
        return None
    records = []
    for i, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:  # a killed run can leave a truncated last line: skip what cannot be read
            warnings.warn(f"{metrics}: line {i} is not valid JSON; ignored for the model card")
    evals = [r for r in records if isinstance(r, dict) and any(k.startswith("eval_") for k in r)]
    if not evals:
        return None
    return {"step": evals[-1].get("step"), **{k[5:]: v for k, v in evals[-1].items()
                                              if k.startswith("eval_") and isinstance(v, (int, float))}}


def write_plan(plan: PushPlan, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """``--dry-run``: write the files a push would upload into ``out_dir`` (atomically, never overwriting)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; --dry-run needs a directory")
    clash = [f for f in plan.files if (out / f).exists()]
    if clash and not force:
        raise OutputExistsError(f"{out / clash[0]} exists; pass --force to overwrite it or choose another directory")
    fmt.atomic_write(out / DEFAULT_FILE, lambda tmp: shutil.copyfile(plan.adapter_path, tmp))
    fmt.atomic_write(out / CARD, lambda tmp: tmp.write_text(plan.card))
    return out


def upload(plan: PushPlan, *, private: bool = False, token: str | None = None) -> str:
    """Create the repo (and branch) if needed and upload both files in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    if hub_offline():
        raise LrsurgeryError("push needs the network; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE), or use "
                             "--dry-run DIR to write the files locally")
    token = token or get_token()
    if not token:
        raise LrsurgeryError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN to a token "
                             "with write access")
    api = HfApi(token=token, library_name="lrsurgery", library_version=__version__)
    try:
        api.create_repo(plan.repo_id, private=private or None, exist_ok=True)
        if plan.revision and plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        info = api.create_commit(plan.repo_id, [CommitOperationAdd(CARD, plan.card.encode()),
                                                CommitOperationAdd(DEFAULT_FILE, str(plan.adapter_path))],
                                 commit_message=plan.message, revision=plan.revision)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "the token was rejected: log in again with `hf auth login`",
                403: f"the token may not write to {plan.repo_id}: use a write token, or a namespace you own"
                }.get(status, "check the repo id and your access")
        raise LrsurgeryError(f"push to {plan.repo_id} failed ({status}): {hint}") from e
    except (OSError, ConnectionError) as e:
        raise LrsurgeryError(f"push to {plan.repo_id} failed: the hub could not be reached ({e})") from e
    return str(getattr(info, "commit_url", info))


# --- model card ------------------------------------------------------------------------------------------

def model_card(adapter: fmt.Adapter, repo_id: str, *, revision: str | None = None,
               recipe: dict[str, Any] | None = None, final_eval: dict[str, Any] | None = None,
               file_sha256: str | None = None) -> str:
    """README.md for the hub: YAML front matter, then base, adapter, training, results and usage sections."""
    from huggingface_hub import ModelCardData
    meta, base = adapter.meta, adapter.meta["base"]
    method = meta.get("method", "lora")
    has_lora = any(e["kind"] == "lora" for e in adapter.modules.values())
    tags = list(dict.fromkeys(["lrsurgery", *(["lora"] if has_lora else []), method]))
    base_ref = base.get("ref") or ""
    base_model = base_ref[3:].partition("@")[0] if base_ref.startswith("hf:") else None
    front = ModelCardData(library_name="lrsurgery", base_model=base_model, tags=tags).to_yaml()
    ref = f"hf:{repo_id}" + (f"@{revision}" if revision else "")
    parts = [f"---\n{front}\n---\n", f"# {repo_id.split('/')[-1]}\n",
             f"A `{method}` adapter for `{base_ref}`, made with lrsurgery {_tool_version(meta)}. It is one "
             f"safetensors file in the lrsurgery adapter format v{fmt.FORMAT_VERSION}: the factors, the "
             "settings, and the SHA-256 of every base weight it modifies, so it refuses to load onto other "
             "weights instead of silently computing something else.\n",
             _base_section(base), _adapter_section(adapter, file_sha256)]
    if recipe:
        parts.append(_training_section(recipe))
    if final_eval:
        parts.append("## Results\n\nFinal evaluation (the last eval record of metrics.jsonl, step "
                     f"{final_eval.get('step')}):\n\n| metric | value |\n|---|---|\n" +
                     "".join(f"| eval {k} | {v:.4f} |\n" for k, v in final_eval.items() if k != "step"))
    parents = meta.get("parents") or []
    if parents:
        parts.append("## Trained on top of\n\nThis adapter changes the base *with these adapters folded in, in "
                     "this order*; lrsurgery refuses to apply it without them:\n\n" +
                     "".join(f"{i}. `{p.get('name')}` (id `{p.get('id', '')[:12]}`, {p.get('method')})\n"
                             for i, p in enumerate(parents, 1)))
    parts.append(_usage_section(ref, base, [p.get("name") or "PARENT" for p in parents]))
    return "\n".join(parts)


def _tool_version(meta: dict[str, Any]) -> str:
    tool = str(meta.get("provenance", {}).get("tool", ""))
    return tool.removeprefix("lrsurgery ") or __version__


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| field | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows if v not in (None, ""))


def _base_section(base: dict[str, Any]) -> str:
    ref = base.get("ref") or ""
    local = bool(ref) and not ref.startswith(("hf:", "timm:"))
    rows = [("reference", f"`{ref}`"), ("library", base.get("library")), ("weights from", base.get("source")),
            ("revision", f"`{base['revision']}`" if base.get("revision") else None),
            ("weights file", f"`{base['weights']}`" if base.get("weights") else None),
            ("weights sha256", f"`{base['weights_sha256']}`" if base.get("weights_sha256") else None),
            ("classes", base.get("num_classes")), ("init seed", base.get("init_seed"))]
    note = ("\nThe base was a local directory when the adapter was made: load the same weights from wherever "
            "you keep them; lrsurgery checks their hashes.\n") if local else ""
    return "## Base model\n\n" + _table(rows) + note


def _module_pattern(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``blocks.N.attn.qkv``: one row per repeated layer."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "N", name) or "(whole model)"


def _span(values: list[int]) -> str:
    """``[4, 8, 4]`` -> ``"4–8"``; a single value as itself."""
    return str(min(values)) if min(values) == max(values) else f"{min(values)}–{max(values)}"


def _adapter_section(adapter: fmt.Adapter, file_sha256: str | None) -> str:
    lora = {n: e for n, e in adapter.modules.items() if e["kind"] == "lora"}
    full = [n for n, e in adapter.modules.items() if e["kind"] == "full"]
    cfg = adapter.meta.get("config", {})
    ranks = [e["rank"] for e in lora.values()]
    rslora = any(e.get("rslora") for e in lora.values())
    alphas = sorted({float(e["alpha"]) for e in lora.values()})
    rows = [("method", adapter.meta.get("method", "lora")),
            ("format", f"lrsurgery adapter v{fmt.FORMAT_VERSION}"),
            ("LoRA modules", len(lora) or None),
            ("trained in full", ", ".join(f"`{n or '(whole model)'}`" for n in full)),
            ("rank", _span(ranks) if ranks else None),
            ("alpha", ", ".join(f"{a:g}" for a in alphas) or None),
            ("scaling", ("alpha/√r (rsLoRA)" if rslora else "alpha/r") if lora else None),
            ("dropout", cfg.get("dropout") or None),
            ("parameters", f"{adapter.num_parameters():,}"),
            ("base weights hashed", f"{len(lora)} (SHA-256 of each weight a LoRA module modifies)" if lora else None),
            ("file sha256", f"`{file_sha256}`" if file_sha256 else None)]
    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for name, e in adapter.modules.items():
        groups.setdefault((_module_pattern(name), e["kind"]), []).append((name, e))
    lines = ["| modules | kind | count | rank | shape (out×in) | parameters |", "|---|---|---|---|---|---|"]
    for (pattern, kind), members in groups.items():
        params = sum(adapter.tensors[k].numel() for n, e in members for k in fmt.expected_tensors(n, e))
        if kind == "lora":
            rank = _span([e["rank"] for _, e in members])
            shapes = sorted({f"{e['out_features']}×{e['in_features']}" for _, e in members})
        else:
            rank, shapes = "–", sorted({"×".join(map(str, s)) for n, e in members
                                        for s in fmt.expected_tensors(n, e).values()})
        lines.append(f"| `{pattern}` | {kind} | {len(members)} | {rank} | {', '.join(shapes)} | {params:,} |")
    return "## Adapter\n\n" + _table(rows) + "\n" + "\n".join(lines) + "\n"


def _training_section(recipe: dict[str, Any]) -> str:
    inject = recipe.get("inject", {})
    lines = ["## Training\n", f"Injected with method `{inject.get('method')}`, rank {inject.get('rank')}, "
             f"alpha {inject.get('alpha')}{', rsLoRA' if inject.get('rslora') else ''}, dropout "
             f"{inject.get('dropout', 0.0)}, seed {recipe.get('seed')}; targets: "
             f"{'`' + json.dumps(spec) + '`' if (spec := inject.get('target_spec')) else 'the family preset'}.\n"]
    sessions = recipe.get("sessions", [])
    if sessions:
        lines += ["| session | data | steps | optimizer | lr | batch size | schedule | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, s in enumerate(sessions, 1):
            c = s.get("config", {})
            lines.append(f"| {i} | `{s.get('data')}` | {s.get('steps')} | {c.get('optim', {}).get('name')} | "
                         f"{c.get('lr')} | {c.get('batch_size')} | {'relora' if c.get('relora') else 'constant'} | "
                         f"{s.get('seconds')} |")
    else:
        lines.append("Not trained yet (the adapter is as injected).")
    return "\n".join(lines) + "\n"


def _usage_section(ref: str, base: dict[str, Any], parents: list[str] | None = None) -> str:
    base_ref = base.get("ref") or "BASE"
    if not base_ref.startswith(("hf:", "timm:")):
        base_ref = "PATH/TO/BASE"
    random = base.get("source") == "random-init"
    kwargs = "".join([f", num_classes={base['num_classes']}" if base.get("num_classes") else "",
                      f', init="random", seed={base.get("init_seed") or 0}' if random else "",
                      ', weights="WEIGHTS.safetensors"' if base.get("weights") else ""])
    weights = " --weights WEIGHTS.safetensors" if base.get("weights") else ""
    if parents:  # a child: its parents first, in order (lrsurgery stack checks the chain)
        chain = " ".join(parents)
        return ("## Use it\n\nStack it on its parents and merge (every adapter is checked against the base and "
                "the chain):\n\n```bash\npip install lrsurgery\n"
                f"lrsurgery stack {base_ref} {chain} {ref}{weights} --merge -o merged\n```\n\nor in Python:\n\n"
                f"```python\nimport lrsurgery\n\nmodel = lrsurgery.load_model(\"{base_ref}\"{kwargs})\n"
                f"lrsurgery.apply_stack(model, [{', '.join(repr(p) for p in parents)}, \"{ref}\"])\n```\n\n"
                f"Pin a commit to get exactly these bytes: `{ref.partition('@')[0]}@COMMIT`.\n")
    return ("## Use it\n\nMerge it into its base on the command line (the adapter is checked against the base "
            "first):\n\n```bash\npip install lrsurgery\n"
            f"lrsurgery merge {base_ref} {ref}{weights} -o merged\n```\n\nor apply it in Python:\n\n"
            f"```python\nimport lrsurgery\n\nmodel = lrsurgery.load_model(\"{base_ref}\"{kwargs})\n"
            f"lrsurgery.apply_adapter(model, \"{ref}\")\n"
            "model = lrsurgery.merge(model)  # optional: plain layers\n```\n\n"
            f"Pin a commit to get exactly these bytes: `{ref.partition('@')[0]}@COMMIT`.\n")
