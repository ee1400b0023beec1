"""Save a pruned model as a folder that reloads without the original dense model: :func:`save_pruned`,
:func:`load_pruned`.

A pruned folder holds::

    config.json                 the Hugging Face config (with ``taskprune_widths``: kept units per block)
    model.safetensors           the shrunk weights (``save_pretrained(safe_serialization=True)``; large models may be
                                sharded: ``model-*.safetensors`` + ``model.safetensors.index.json``)
    taskprune_spec.json         the :class:`~taskprune.spec.PruneSpec` (kept indices + the dense fingerprint)
    tokenizer files             when a tokenizer is given
    .taskprune                  the marker of a taskprune export: ``overwrite`` replaces only such a folder (or an
                                empty one), never the input model's folder nor one with files taskprune did not write
    heads.safetensors, tasks.json   only for a :class:`taskprune.models.multitask.TaskModel` (the zoo's own head format)
    own_head.safetensors, own_head.json   only for a module of your own that holds the HF model (e.g. an encoder plus
                                a head): the tensors of your module outside the HF model, and where the HF model sits
                                and your class's name (``module:QualName``, for information: never imported)

Loading replays the spec: the dense architecture is built from the config (the dense widths come back from the
spec's fingerprint), :func:`~taskprune.surgery.shrink_` cuts it to the kept units -- which also installs any
hooks an adapter needs, which take the kept *indices*, not only the widths -- and the weights are loaded strictly. Only
safetensors and JSON are read; the model class is looked up in ``transformers`` by name (never remote code).

Where every block of a kind keeps the same number of units and the config can say so (the FFN width for every
family; head counts where the adapter records them: :meth:`taskprune.arch.Adapter.record_widths_`), the folder also
loads with plain ``transformers.AutoModel*.from_pretrained``; per-layer widths and adapters that install hooks on a
shrink need :func:`load_pruned`.

Example::

    shrink_(model, spec)
    save_pruned(model, spec, "pruned/", tokenizer=tokenizer)
    model = load_pruned("pruned/")           # eval mode, same outputs as the in-memory shrunk model

    # your own module (an encoder plus a head of yours): build it as usual, the pruned encoder and head go into it
    mine = load_pruned("pruned/", into=MyModel(...))
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from taskprune.arch import adapter_for, find_base, find_hf_model, get_architecture, weight_in_out
from taskprune.io import MARKER, atomic_dir, check_replaceable
from taskprune.spec import SHRUNK_BY, PruneSpec, fingerprint_diff
from taskprune.surgery import active_mask, shrink_

log = logging.getLogger(__name__)

SPEC_FILE = "taskprune_spec.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEADS_FILE = "heads.safetensors"  # zoo format (taskprune.models.multitask.save_multitask), for TaskModel exports
TASKS_FILE = "tasks.json"
OWN_HEAD_FILE = "own_head.safetensors"  # the tensors of the user's own module outside the HF model
OWN_HEAD_META = "own_head.json"
OWN_HEAD_FORMAT = "taskprune.own_head/1"


# ---------------------------------------------------------------------------------------------------- helpers
def _is_task_model(model: nn.Module) -> bool:
    mt = sys.modules.get("taskprune.models.multitask")  # a TaskModel exists only once that is imported (it pulls torchmetrics)
    return mt is not None and isinstance(model, mt.TaskModel)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def input_folders(model: nn.Module) -> list[Path]:
    """Local folders ``model`` was loaded from (``config.name_or_path`` of its Hugging Face model), if any."""
    try:
        hf, _ = find_hf_model(model)
    except (TypeError, ValueError):
        return []
    name = getattr(getattr(hf, "config", None), "name_or_path", None) or ""
    return [Path(name)] if name and Path(name).is_dir() else []


def check_export_dir(path: str | os.PathLike, overwrite: bool, protect: dict[str, str | os.PathLike | None] = {},
                     what: str = "export folder") -> None:
    """Refuse, before any work, an export folder whose replacement would lose data.

    ``protect`` maps a description to a folder that must survive (the input model's folder, the run's output_dir):
    ``path`` equal to one of them, or holding one, is refused (``ValueError``) whatever ``overwrite`` says. An
    existing ``path`` is refused without ``overwrite``, and with it unless it is empty or an earlier taskprune
    export (its ``.taskprune`` marker): ``FileExistsError``.
    """
    target = Path(path).absolute().resolve()
    for name, folder in protect.items():
        if folder is None or str(folder) == "":
            continue
        kept = Path(folder).absolute().resolve()
        if target == kept or target in kept.parents:
            where = "is" if target == kept else "holds"
            raise ValueError(f"{what} {str(path)!r} {where} the {name} ({str(folder)!r}); an export replaces the whole "
                             "folder and would delete it. Choose a separate folder, e.g. "
                             f"{str(Path(folder).parent / (Path(folder).name + '-pruned'))!r}")
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} already exists; pass overwrite=True to replace an earlier "
                              "taskprune export, or choose another folder")
    check_replaceable(path, "export", what)


# ---------------------------------------------------------------------------------------------------- save
def save_pruned(model: nn.Module, spec: PruneSpec, path: str | os.PathLike, tokenizer=None,
                overwrite: bool = False) -> Path:
    """Write ``model``, pruned by ``spec``, to the folder ``path`` (atomically) and return the path.

    Args:
        model: a Hugging Face model, a :class:`taskprune.models.multitask.TaskModel` (encoder + head) or a module holding a HF
            model, either already shrunk by ``spec`` (``shrink_(model, spec)``) or still dense. A dense model is
            **not** changed: a deep copy is shrunk and saved (this needs memory for a second model; call
            :func:`~taskprune.surgery.shrink_` first to avoid it).
        spec: the spec the model was (or is to be) shrunk by.
        path: the output folder.
        tokenizer: a transformers tokenizer, or the path of one, saved alongside (optional).
        overwrite: replace an existing folder written by an earlier ``save_pruned`` (its ``.taskprune`` marker) or an
            empty one (otherwise ``FileExistsError``). A folder with files taskprune did not write, and the folder
            the model was loaded from, are never replaced.

    Everything is checked before anything is written: a spec made for another model, or another spec of the same
    widths as the one ``shrink_`` applied, raises ``ValueError`` and leaves no folder. For a module of your own
    that holds the HF model (not a ``TaskModel``; e.g. an encoder plus a head), the HF model is saved as above and
    every tensor of your module outside it (its ``state_dict``: head, pooler, ...) goes to ``own_head.safetensors``;
    ``load_pruned(path, into=YourModule(...))`` puts both back into a module you build.
    """
    if not isinstance(spec, PruneSpec):
        raise TypeError(f"expected a taskprune PruneSpec, got {type(spec).__name__}; load one with PruneSpec.load")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module (a Hugging Face model or a TaskModel), got {type(model).__name__}")
    for folder in input_folders(model):
        check_export_dir(path, overwrite, {"folder the model was loaded from": folder})
    check_export_dir(path, overwrite)
    if active_mask(model) is not None:
        raise ValueError("the model carries a soft mask (apply_mask / MaskBank.activate); a mask is not saved. Call "
                         "taskprune.surgery.remove_mask(model) first, or export through MaskBank.export")
    state = spec.validate(model)  # ValueError for a spec of another model: nothing written yet
    if state == "dense" and (_drops(spec) or spec.scales or spec.columns or spec.biases):
        log.info("model is dense: shrinking a copy for export, its tuning folded in (the model passed in is unchanged)")
        model = shrink_(copy.deepcopy(model), spec)
    hf, where = find_hf_model(model)
    task_model = _is_task_model(model)
    own = {} if task_model else _own_state(model, where)
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    with atomic_dir(path, overwrite, marker="export") as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        spec.save(tmp / SPEC_FILE)
        if task_model:
            _save_head(model, tmp)
        if own:
            _save_own_head(model, where, own, tmp)
    log.info("saved pruned %s (%d parameters) to %s", type(model).__name__, _n_params(model), path)
    if own:
        log.info("saved the %d tensor(s) of %s outside its Hugging Face model to %s; reload with "
                 "load_pruned(path, into=%s(...))", len(own), type(model).__name__, OWN_HEAD_FILE, type(model).__name__)
    return Path(path)


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}:{type(module).__qualname__}"


def _own_state(model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` outside the HF model at ``where`` (nothing when ``model`` is it)."""
    if not where:
        return {}
    prefix = where + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    bad = [k for k, v in own.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{type(model).__name__} has state outside its Hugging Face model that is not a tensor "
                         f"({bad[:3]}), which safetensors cannot hold; save_pruned(model.{where}, ...) saves the "
                         "Hugging Face model alone, and save the rest yourself")
    return own


def _save_own_head(model: nn.Module, where: str, own: dict[str, torch.Tensor], folder: Path) -> None:
    """``own_head.safetensors`` (the tensors outside the HF model) + ``own_head.json`` (where the HF model sits)."""
    from safetensors.torch import save_file

    from taskprune.io import atomic_write_json

    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in own.items()}, str(folder / OWN_HEAD_FILE))
    atomic_write_json(folder / OWN_HEAD_META, {"format": OWN_HEAD_FORMAT, "class": _class_path(model),
                                               "hf_path": where})


def _drops(spec: PruneSpec) -> bool:
    return any(s["dropped"] for s in spec.summary().values())


def _save_head(task_model: nn.Module, folder: Path) -> None:
    """The head in the zoo's format (``heads.safetensors`` + ``tasks.json``), via the zoo's own helpers."""
    from safetensors.torch import save_file

    from taskprune.io import atomic_write_json
    from taskprune.models.multitask import MultiTaskModel, heads_state, tasks_json

    one = MultiTaskModel(task_model.encoder, {task_model.task: task_model.info}, {task_model.task: task_model.head},
                         task_model.pooling)
    save_file(heads_state(one), str(folder / HEADS_FILE))
    atomic_write_json(folder / TASKS_FILE, tasks_json(one))


# ---------------------------------------------------------------------------------------------------- load
def load_pruned(path: str | os.PathLike, model_class=None, into: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`; returns it in eval mode.

    Args:
        path: the folder written by :func:`save_pruned`.
        model_class: a ``transformers`` model class or Auto class to build (default: ``config.architectures[0]``,
            looked up in ``transformers``; remote code is never run).
        into: for a folder saved from a module of your own (an encoder plus your head: ``own_head.safetensors``),
            an instance of that module, built as you build it (its encoder may be dense or random). The pruned HF
            model replaces the one at the saved path inside it, and its tensors outside that (your head) are loaded
            from ``own_head.safetensors``, after checking that the names and shapes match. No code is imported.

    Returns, in eval mode:

    * ``into`` (the same object, modified in place) when ``into`` is given;
    * a :class:`taskprune.models.multitask.TaskModel` (encoder + task head) when the folder holds ``tasks.json``;
    * otherwise the Hugging Face model that was saved, as its own class (``config.architectures[0]``): the whole
      ``*ForSequenceClassification`` with its head when that is what was pruned, but only the bare encoder when
      it was saved from a module of your own, whose head is not in it (a ``UserWarning`` says so; pass ``into``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a corrupt file, a config, spec and
    weights that do not agree, or an ``into`` whose tensors do not match the folder's, each naming the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no pruned model folder at {str(folder)!r}; pass the folder given to save_pruned")
    for name in (CONFIG_FILE, SPEC_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder / name)!r} is missing; {str(folder)!r} is not a complete folder "
                                    "written by taskprune.export.save_pruned")
    own = _read_own_head(folder, into)  # checked before the model is built
    spec = PruneSpec.load(folder / SPEC_FILE)
    config = _dense_config(folder, spec)
    cls = _model_class(config, model_class, folder)
    dtype, state, source = _read_weights(folder)
    model = _instantiate(cls, config, dtype)
    diffs = fingerprint_diff(spec.fingerprint, get_architecture(model).fingerprint())
    if diffs:
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} builds a model other than the one {str(folder / SPEC_FILE)!r} "
                         f"was made for: {'; '.join(diffs[:3])}. The folder mixes files of two exports")
    shrink_(model, replace(spec, scales={}, columns={}, biases={}))  # the saved weights hold any tuning
    _add_biases(model, spec)
    _load_state(model, state, source)
    model.eval()
    if into is not None:
        return _into(into, model, own, folder)
    if (folder / TASKS_FILE).is_file():
        return _task_model(model, folder)
    if own is not None:
        warnings.warn(f"{str(folder)!r} was saved from {own['class']} (a module of your own holding this model at "
                      f"{own['hf_path']!r}); load_pruned returns the bare {type(model).__name__} without your head. "
                      f"Pass into={own['class'].rpartition(':')[2]}(...) to get your module with its head back",
                      UserWarning, stacklevel=2)
    return model


def _read_own_head(folder: Path, into: nn.Module | None) -> dict | None:
    """``own_head.json`` (+ the tensors of ``own_head.safetensors`` when ``into`` is given), or ``None``; checks
    ``into`` against them before anything is built."""
    meta_file, file = folder / OWN_HEAD_META, folder / OWN_HEAD_FILE
    if into is not None and not isinstance(into, nn.Module):
        raise TypeError(f"into must be your own nn.Module (an instance of the module save_pruned saved), got "
                        f"{type(into).__name__}")
    if into is not None and (folder / TASKS_FILE).is_file():
        raise ValueError(f"{str(folder)!r} holds a TaskModel (tasks.json), which load_pruned rebuilds itself; leave "
                         "into= out")
    if not meta_file.is_file():
        if into is None:
            return None
        _, where = find_hf_model(into)
        if not where:
            raise ValueError(f"into must be a module of your own that holds a Hugging Face model; "
                             f"{type(into).__name__} is one itself: call load_pruned without into=")
        outside = [k for k in into.state_dict() if not k.startswith(where + ".")]
        if outside:
            raise ValueError(f"{str(folder)!r} holds no {OWN_HEAD_FILE}: it was saved from a Hugging Face model, not "
                             f"from a module of your own, so {type(into).__name__}'s tensors outside it "
                             f"({outside[:3]}) would stay as built; call load_pruned without into= and put the "
                             "model into your module yourself")
        return {"class": _class_path(into), "hf_path": where, "state": {}}
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != OWN_HEAD_FORMAT or not isinstance(meta.get("hf_path"), str) or not meta["hf_path"]:
            raise ValueError(f"format {meta.get('format')!r}, hf_path {meta.get('hf_path')!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError) as e:
        raise ValueError(f"{str(meta_file)!r} is not an own-head description written by save_pruned ({e}); export "
                         "the model again") from None
    if into is None:
        return meta
    state = _load_safetensors(file, f"{str(meta_file)!r} says the folder holds your head")
    where = meta["hf_path"]
    try:
        into.get_submodule(where)
    except AttributeError:
        raise ValueError(f"{str(folder)!r} was saved from {meta['class']} with its Hugging Face model at {where!r}, "
                         f"but {type(into).__name__} has no submodule {where!r}; pass an instance of "
                         f"{meta['class']}") from None
    mine = {k: v for k, v in into.state_dict().items() if not k.startswith(where + ".")}
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    shapes = [f"{k}: file {tuple(state[k].shape)}, yours {tuple(mine[k].shape)}" for k in state
              if k in mine and tuple(state[k].shape) != tuple(mine[k].shape)]
    parts = [f"{what} {found[:3]}{' ...' if len(found) > 3 else ''}" for what, found in
             (("not in the file:", missing), ("not in your module:", unexpected), ("other shapes:", shapes)) if found]
    if parts:
        raise ValueError(f"{type(into).__name__} does not match the head saved in {str(file)!r} (from "
                         f"{meta['class']}): {'; '.join(parts)}. Build into= as the saved module was built (same "
                         "class and head sizes)")
    return {**meta, "state": state}


def _into(into: nn.Module, model: nn.Module, own: dict, folder: Path) -> nn.Module:
    """``into`` with the pruned HF model at ``own["hf_path"]`` and its own tensors loaded; eval mode."""
    parent, _, name = own["hf_path"].rpartition(".")
    setattr(into.get_submodule(parent) if parent else into, name, model)
    if own["state"]:
        into.load_state_dict(own["state"], strict=False)  # names and shapes checked in _read_own_head
    log.info("loaded the pruned %s and %d tensor(s) of your module from %s into %s", type(model).__name__,
             len(own["state"]), folder, type(into).__name__)
    return into.eval()


def _add_biases(model: nn.Module, spec: PruneSpec) -> None:
    """Zero biases on the projections a refit gave one (``fit="bias"`` / ``"columns_bias"``): the model the config
    builds has none there; the saved weights fill them."""
    base, _ = find_base(model)
    arch = get_architecture(model)
    paths = set(spec.meta.get("added_biases", []))
    for kind, blocks in spec.biases.items():
        paths.update(b.out if kind == "heads" else b.down for b in arch.blocks(kind) if b.name in blocks)
    for path in sorted(paths):
        proj = base.get_submodule(path)
        if getattr(proj, "bias", None) is None:
            w = proj.weight
            proj.bias = nn.Parameter(torch.zeros(weight_in_out(proj).shape[1], dtype=w.dtype, device=w.device))


def _dense_config(folder: Path, spec: PruneSpec):
    """The config with the dense widths the spec was made for (``shrink_`` may have set uniform kept widths)."""
    from transformers import AutoConfig

    file = folder / CONFIG_FILE
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(file)!r} as a transformers config ({e}); the file is corrupt or not "
                         "written by save_pretrained. Export the model again with save_pruned") from None
    fp = spec.fingerprint
    if config.model_type != fp.get("model_type"):
        raise ValueError(f"{str(file)!r} is for model_type {config.model_type!r} but {str(folder / SPEC_FILE)!r} was "
                         f"made for {fp.get('model_type')!r}; the folder mixes files of two exports")
    widths = getattr(config, "taskprune_widths", None)
    shrunk = spec.shrunk_fingerprint()
    if widths is not None:
        recorded = {k: widths.get(k, {}) for k in ("heads", "neurons")}
        expected = {k: shrunk[k] for k in ("heads", "neurons")}
        if recorded != expected:
            diffs = fingerprint_diff(expected, recorded)
            raise ValueError(f"{str(file)!r} records taskprune_widths that differ from the kept widths of "
                             f"{str(folder / SPEC_FILE)!r}: {'; '.join(diffs[:3])}. The folder mixes files of two "
                             "exports; export the model again with save_pruned")
    recorded = getattr(config, SHRUNK_BY, None)
    if recorded is not None and recorded != spec.identity():
        raise ValueError(f"{str(file)!r} was written for a model shrunk by spec {recorded}, but "
                         f"{str(folder / SPEC_FILE)!r} is spec {spec.identity()} (same widths, other units): the "
                         "folder mixes files of two exports. Export the model again with save_pruned")
    adapter_for(config.model_type).dense_config_(config, fp)
    return config


def _model_class(config, model_class, folder: Path):
    import transformers

    if model_class is not None:
        if not (isinstance(model_class, type) and (hasattr(model_class, "from_config")
                                                   or hasattr(model_class, "_from_config"))):
            raise TypeError(f"model_class must be a transformers model class or Auto class, got {model_class!r}")
        return model_class
    names = getattr(config, "architectures", None) or []
    if not names:
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} names no architecture (config.architectures is empty); pass "
                         "model_class=, e.g. transformers.AutoModel")
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} names architecture {names[0]!r}, which is not a model class "
                         f"of transformers {transformers.__version__} (remote code is never loaded); pass "
                         "model_class=")
    return cls


def _instantiate(cls, config, dtype: torch.dtype) -> nn.Module:
    """The dense model, without random initialisation (every weight is loaded afterwards)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=dtype)
        else:
            model = cls.from_config(config, dtype=dtype)  # Auto classes
    model.tie_weights()  # skipped with the initialisation; ties lm_head / embeddings as from_pretrained does
    return model


def _read_weights(folder: Path) -> tuple[torch.dtype, dict[str, torch.Tensor], str]:
    """``(dtype, state_dict, file description)`` from ``model.safetensors`` or a sharded index."""
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index ({e!r}); export the model again") from None
        files = [folder / s for s in shards]
    else:
        raise FileNotFoundError(f"{str(single)!r} is missing (and there is no {WEIGHTS_INDEX}); {str(folder)!r} is "
                                "not a complete folder written by save_pruned")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_load_safetensors(f, f"{str(index)!r} lists it"))
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    return dtype, state, str(files[0] if len(files) == 1 else index)


def _load_safetensors(file: Path, listed_by: str) -> dict[str, torch.Tensor]:
    """The tensors of one file of an export folder: ``FileNotFoundError`` naming who lists a missing file,
    ``ValueError`` for a truncated or corrupt one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing; {listed_by}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({e}); it is truncated or corrupt. "
                         "Export the model again with save_pruned") from None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load, except for tied weights that ``save_pretrained`` stores once (e.g. ``lm_head.weight``)."""
    own = model.state_dict(keep_vars=True)
    loaded_ids = {id(own[k]) for k in state if k in own}
    missing = [k for k in own if k not in state and id(own[k]) not in loaded_ids]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source!r} does not match the model rebuilt from config.json + {SPEC_FILE}: missing keys "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}. The folder mixes files of two exports")
    bad = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{source!r} holds tensors whose shapes differ from the model rebuilt from config.json + "
                         f"{SPEC_FILE}: {bad[:3]}. The weights and the spec come from different exports")
    model.load_state_dict(state, strict=False)


def _task_model(encoder: nn.Module, folder: Path) -> nn.Module:
    """A :class:`taskprune.models.multitask.TaskModel` from the encoder and the folder's single head (zoo format)."""
    from taskprune.models.multitask import HeadInfo, MultiTaskModel, head_from_state

    tasks_file, heads_file = folder / TASKS_FILE, folder / HEADS_FILE
    try:
        meta = json.loads(tasks_file.read_text())
        (task, d), = meta["tasks"].items()
        info = HeadInfo(tuple(d["label_names"]), int(d["n_labels"]), bool(d["regression"]), float(d["output_scale"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{str(tasks_file)!r} is not a one-task tasks.json written by save_pruned ({e!r})") from None
    state = _load_safetensors(heads_file, f"{str(tasks_file)!r} says the folder holds a head")
    head = head_from_state(state, task, heads_file)
    has_tok = (folder / "tokenizer_config.json").is_file()
    multi = MultiTaskModel(encoder, {task: info}, {task: head}, meta.get("pooling", "mean"),
                           str(folder) if has_tok else None)
    return multi.for_task(task).eval()


__all__ = ["save_pruned", "load_pruned", "check_export_dir", "find_hf_model", "atomic_dir", "MARKER"]
