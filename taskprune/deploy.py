"""Deploy a pruned model with ONNX Runtime: :func:`save_onnx` (fp32 or dynamic int8), :func:`load_onnx`.

An ONNX folder holds::

    model.onnx              the graph: inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
                            model uses token types), ``[batch, sequence]`` int64 with both axes dynamic; output
                            ``logits`` (``[batch, n_labels]``, or ``[batch, sequence, vocab]`` for a language model)
    onnx.json               opset, optimisation level, quantisation, inputs, labels, the check against PyTorch
                            (max |delta logit| on how many rows; int8: argmax agreement with the fp32 graph), versions
    taskprune_spec.json     the :class:`~taskprune.spec.PruneSpec`, when one is given
    tokenizer files         when a tokenizer is given
    .taskprune              the marker of a taskprune export (as :func:`taskprune.export.save_pruned` writes)

Every per-layer width is in the weights' shapes, so a model with a different head count and FFN width per block --
a block with no head at all included -- runs in ONNX Runtime as it is; nothing is padded back.

How it is made, in order; the folder is built in a temporary sibling and renamed into place only after the check
passed, so an error leaves nothing at ``folder``:

1. ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``): it exports blocks shrunk to zero heads, which
   the torch.export-based exporter of torch 2.13 turns into a ``Reshape`` that fails at run time, and takes ~1.5 s
   instead of ~8 s on a tiny model.
2. fp32: ONNX Runtime's graph optimiser at ``optimize`` (``SessionOptions.graph_optimization_level`` with
   ``optimized_model_filepath``) writes ``model.onnx``. int8: the graph optimised at ``basic`` (standard ONNX ops
   only) is quantised by ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantised per
   batch), then optimised at ``optimize``: quantising an ``extended`` graph fails (its fused contrib ops have no
   shape inference) and would leave the fused matrix products in fp32.
3. The logits of ONNX Runtime are compared with PyTorch's on ``example`` (when given) and on a generated batch of
   another size and length with padded rows: the fp32 graph must agree within ``FP32_ATOL`` (1e-4), else
   ``ValueError`` and nothing is written. For int8 the agreement of its argmax with the fp32 graph is recorded.

Which level to save: ``basic`` (the default) keeps the file portable (standard ops, any execution provider);
:func:`load_onnx` still applies every optimisation (``ORT_ENABLE_ALL``) online when the session starts, so nothing is
lost at run time. ``extended`` saves ONNX Runtime's fused CPU / CUDA contrib ops (Gelu, SkipLayerNormalization,
FusedMatMul, DynamicQuantizeMatMul), saving that work at load; ``all`` also saves layout transformations that
ONNX Runtime says fit only the machine they were made on.

Architectures: encoders and decoders whose forward maps ``input_ids`` (+ masks) to ``logits`` -- tested on BERT,
LLaMA (with grouped-query attention) and GPT-2, their ``*ForSequenceClassification`` and LM heads, and the multi-task
:class:`~taskprune.models.multitask.TaskModel` (encoder + task head). Encoder-decoder models (T5) need decoder inputs
and are refused.

``onnx`` and ``onnxruntime`` are an optional extra: ``pip install -e '.[deploy]'``.

Example::

    shrink_(model, spec)
    save_onnx(model, "pruned-onnx/", tokenizer=tokenizer, spec=spec, quantize="int8", example=batch)
    runner, tokenizer = load_onnx("pruned-onnx/")
    logits = runner(**tokenizer(["a fine film"], return_tensors="pt")).logits
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from taskprune.arch import find_hf_model
from taskprune.export import SPEC_FILE, _drops, _is_task_model, check_export_dir, input_folders
from taskprune.io import atomic_dir, atomic_write_json
from taskprune.spec import PruneSpec
from taskprune.surgery import active_mask, shrink_

log = logging.getLogger(__name__)

Optimize = Literal["none", "basic", "extended", "all"]
Quantize = Literal["int8"]
OPTIMIZE: tuple[str, ...] = get_args(Optimize)
QUANTIZE: tuple[str, ...] = get_args(Quantize)
MODEL_FILE = "model.onnx"
INFO_FILE = "onnx.json"
FP32_ATOL = 1e-4  # max |ONNX Runtime logit - PyTorch logit| an fp32 export may show
MIN_OPSET = 14  # scaled_dot_product_attention (transformers' default attention) exports from opset 14
MAX_OPSET = 20  # the TorchScript exporter of torch 2.4 - 2.14 writes opsets up to 20
MAX_BYTES = 2**31 - 2**26  # one ONNX protobuf holds at most 2 GiB; the weights must fit with room for the graph
INSTALL_HINT = "pip install -e '.[deploy]'  (or: pip install onnx onnxruntime)"
_CHECK_ROWS, _CHECK_LEN = 16, 24  # the generated check batch: rows, and at most this many tokens


def require_extra() -> tuple:
    """``(onnx, onnxruntime)``, or ``ImportError`` naming the extra to install (call it early to fail fast)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"the ONNX export needs the packages onnx and onnxruntime ({e.msg}); install them with "
                          f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class OnnxOptions:
    """How :func:`save_onnx` builds the graph (a YAML section: ``{opset: 17, optimize: basic, quantize: int8}``).

    Args:
        opset: the ONNX opset, from 14 (``scaled_dot_product_attention``) to 20 (the newest the TorchScript exporter
            writes).
        optimize: the ONNX Runtime graph optimisation level saved in ``model.onnx``: ``none``, ``basic`` (standard
            ops: portable; :func:`load_onnx` applies the rest when the session starts), ``extended`` (fused CPU /
            CUDA contrib ops), ``all`` (also layouts for this machine only).
        quantize: ``None`` (fp32) or ``"int8"`` (dynamic quantisation: int8 weights, activations per batch).
    """

    opset: int = 17
    optimize: Optimize = "basic"
    quantize: Quantize | None = None

    def __post_init__(self) -> None:
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"opset={self.opset!r}; allowed: an integer from {MIN_OPSET} to {MAX_OPSET} (the "
                             "TorchScript exporter's range), e.g. 17")
        if self.optimize not in OPTIMIZE:
            raise ValueError(f"optimize={self.optimize!r}; allowed: {list(OPTIMIZE)} (basic keeps the file portable; "
                             "the session applies the rest when it starts)")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize={self.quantize!r}; allowed: None (fp32) or {list(QUANTIZE)}")


# ---------------------------------------------------------------------------------------------------- save
def save_onnx(model: nn.Module, folder: str | os.PathLike, *, tokenizer=None, spec: PruneSpec | None = None,
              opset: int = 17, optimize: Optimize = "basic", quantize: Quantize | None = None,
              example: Mapping[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """Export ``model`` to ONNX in ``folder`` (atomically), checked against PyTorch first; return the folder.

    Args:
        model: a Hugging Face model whose forward returns ``logits`` (a ``*ForSequenceClassification``, a causal LM),
            or a :class:`taskprune.models.multitask.TaskModel` (encoder + task head, exported as one graph); pruned
            (``shrink_``) or dense, float32, without a soft mask. It is not changed.
        folder: the output folder.
        tokenizer: a transformers tokenizer, or the path of one, saved alongside (optional).
        spec: the :class:`~taskprune.spec.PruneSpec` the model was shrunk by, saved as ``taskprune_spec.json``
            (optional). With a dense model and a spec that drops units, a shrunk copy is exported.
        opset, optimize, quantize: see :class:`OnnxOptions`.
        example: a batch (``input_ids [batch, seq]``, optional ``attention_mask``, ``token_type_ids``; other keys
            are ignored), e.g. tokenized rows of the task: traced, and checked along with a generated batch.
        overwrite: replace an existing folder written by an earlier taskprune export (its ``.taskprune`` marker) or an
            empty one (otherwise ``FileExistsError``); never a folder of other files or the model's own folder.

    Raises ``ImportError`` without onnx / onnxruntime, ``ValueError`` / ``TypeError`` for a model, option or
    example that cannot be exported, ``FileExistsError`` for a folder that may not be replaced, and ``ValueError``
    when ONNX Runtime's logits differ from PyTorch's by more than ``FP32_ATOL``; in every case nothing is written.
    """
    options = OnnxOptions(opset, optimize, quantize)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module (a Hugging Face model or a TaskModel), got {type(model).__name__}")
    if spec is not None and not isinstance(spec, PruneSpec):
        raise TypeError(f"spec must be a taskprune PruneSpec or None, got {type(spec).__name__}; load one with "
                        "PruneSpec.load")
    require_extra()
    hf, _ = find_hf_model(model)  # TypeError when there is none
    task_model = _is_task_model(model)
    _check_exportable(model, hf, task_model)
    for origin in input_folders(model):
        check_export_dir(folder, overwrite, {"folder the model was loaded from": origin}, what="ONNX folder")
    check_export_dir(folder, overwrite, what="ONNX folder")
    if spec is not None and spec.validate(model) == "dense" and _drops(spec):  # ValueError for another model's spec
        log.info("model is dense: shrinking a copy for export (the model passed in is unchanged)")
        model = shrink_(copy.deepcopy(model), spec)
        hf, _ = find_hf_model(model)
    names = _input_names(hf)
    device = next(model.parameters()).device
    if example is not None:  # traced on the user's rows, checked on them and on generated rows of another shape
        trace = _example_batch(example, names, device)
        n_rows = trace["input_ids"].shape[0] + 3
    else:
        trace, n_rows = _generated_batch(hf, names, 2, 8, 0, device), _CHECK_ROWS
    check = _generated_batch(hf, names, n_rows, _other_length(hf, trace["input_ids"].shape[1]), 1, device)
    batches = [trace, check]
    wrapper = _Logits(model, names, "use_cache" in inspect.signature(hf.forward).parameters)
    with _eval(model), torch.no_grad():
        expected = [wrapper(*(b[n] for n in names)) for b in batches]
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    with atomic_dir(folder, overwrite, marker="export") as tmp:
        work = tmp / ".build"
        work.mkdir()
        info = _build(wrapper, model, names, trace, batches, expected, options, work, tmp / MODEL_FILE)
        shutil.rmtree(work)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if spec is not None:
            spec.save(tmp / SPEC_FILE)
        atomic_write_json(tmp / INFO_FILE, {**info, **_describe(model, hf, task_model)})
    log.info("exported %s to %s (%s, opset %d, optimize %s): max |delta logit| %.2g vs PyTorch on %d rows%s",
             type(model).__name__, folder, quantize or "fp32", opset, optimize, info["check"]["max_abs_diff_fp32"],
             info["check"]["rows"], f", int8 argmax agreement {info['check']['int8_argmax_agreement']:.3f}"
             if quantize else "")
    return Path(folder)


def _check_exportable(model: nn.Module, hf: nn.Module, task_model: bool) -> None:
    """Refuse, before any work, what cannot be exported: a soft mask, an encoder-decoder, another dtype, > 2 GiB."""
    if active_mask(model) is not None:
        raise ValueError("the model carries a soft mask (apply_mask / MaskBank.activate), which would be exported as "
                         "dense weights times gates; call taskprune.surgery.shrink_(model, spec) on the dense model "
                         "instead (or MaskBank.export, then load_pruned)")
    config = hf.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(hf).__name__} is an encoder-decoder model ({config.model_type}), whose forward needs "
                         "decoder inputs; save_onnx exports encoders and decoders that map input_ids to logits "
                         "(BERT-style, LLaMA, GPT-2, a TaskModel). Save it with taskprune.export.save_pruned")
    if not task_model and "input_ids" not in inspect.signature(hf.forward).parameters:
        raise ValueError(f"{type(hf).__name__}.forward takes no input_ids; save_onnx exports text models that map "
                         "input_ids to logits")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float32}:
        raise ValueError(f"the model's weights are {sorted(str(d) for d in dtypes)}; save_onnx exports float32 (and "
                         "quantises to int8 with quantize='int8'). Export a float32 copy: copy.deepcopy(model).float()")
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if n_bytes > MAX_BYTES:
        raise ValueError(f"the model's weights take {n_bytes / 2**30:.2f} GiB; one ONNX file holds less than 2 GiB "
                         "and save_onnx does not write external weight files. Prune it further or export it with "
                         "torch.onnx.export(..., external_data=True) yourself")


def _input_names(hf: nn.Module) -> list[str]:
    """``input_ids``, ``attention_mask``, and ``token_type_ids`` where the model takes them and has more than one
    token type (RoBERTa-style models have one: their tokenizers send none)."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(hf.forward).parameters and getattr(hf.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


class _Logits(nn.Module):
    """``(input_ids, attention_mask[, token_type_ids]) -> logits``: the traced function."""

    def __init__(self, model: nn.Module, names: list[str], no_cache: bool):
        super().__init__()
        self.model, self.names, self.no_cache = model, names, no_cache

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs))
        if self.no_cache:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(f"{type(self.model).__name__} returns no logits ({type(out).__name__}); export a model "
                             "with a head: a *ForSequenceClassification, a causal LM or a TaskModel")
        return logits


@contextlib.contextmanager
def _eval(model: nn.Module):
    """Eval mode for the duration, then the training flags as they were."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _max_length(hf: nn.Module) -> int:
    config = hf.config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    return max(2, n - 2)  # RoBERTa-style positions start after the padding index


def _other_length(hf: nn.Module, length: int) -> int:
    """A sequence length other than ``length`` (so the check runs a shape the trace did not see)."""
    limit = _max_length(hf)
    longer = min(limit, max(length + 5, _CHECK_LEN))
    return longer if longer != length else max(2, length // 2)


def _generated_batch(hf: nn.Module, names: list[str], rows: int, length: int, seed: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids (seeded), every other row right-padded, token types 0 then 1 on odd rows."""
    config = hf.config
    g = torch.Generator().manual_seed(seed)
    vocab = getattr(config, "vocab_size", None) or 100
    ids = torch.randint(min(3, vocab - 1), vocab, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for i in range(1, rows, 2):
        mask[i, max(1, length - 1 - i % (length // 2 + 1)):] = 0
    pad = getattr(config, "pad_token_id", None)
    ids = ids.masked_fill(mask == 0, pad if isinstance(pad, int) else 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        types = torch.zeros(rows, length, dtype=torch.long)
        types[1::2, length // 2:] = 1
        batch["token_type_ids"] = types * mask
    return {k: v.to(device) for k, v in batch.items()}


def _example_batch(example, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(example, Mapping) or "input_ids" not in example:
        raise TypeError(f"example must be a batch: a mapping with input_ids (and optionally attention_mask, "
                        f"token_type_ids), e.g. tokenizer(texts, padding=True, return_tensors='pt'); got "
                        f"{type(example).__name__}{'' if not isinstance(example, Mapping) else ' without input_ids'}")
    batch = {}
    ids = example["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"example['input_ids'] must be a torch tensor [batch, seq], got {type(ids).__name__}; "
                        "tokenize with return_tensors='pt'")
    for name in names:
        value = example.get(name)
        if value is None:
            value = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point() or \
                value.shape != ids.shape:
            raise ValueError(f"example[{name!r}] must be an integer tensor [batch, seq] shaped like input_ids "
                             f"{tuple(ids.shape)}, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        batch[name] = value.to(device=device, dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------------- build
def _build(wrapper: _Logits, model: nn.Module, names: list[str], trace: dict, batches: list[dict],
           expected: list[torch.Tensor], options: OnnxOptions, work: Path, target: Path) -> dict:
    """Export, optimise, (quantise,) check; write ``target``; return the ``onnx.json`` fields."""
    _, ort = require_extra()
    raw = work / "exported.onnx"
    out_axes = {0: "batch", 1: "sequence"} if expected[0].dim() == 3 else {0: "batch"}
    with _eval(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; tracer warnings (checked)
        torch.onnx.export(wrapper, tuple(trace[n] for n in names), str(raw), input_names=names,
                          output_names=["logits"], opset_version=options.opset, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": out_axes})
    wanted = [e.detach().float().cpu().numpy() for e in expected]
    if options.quantize is None:
        _optimize(raw, target, options.optimize)
        fp32 = target
    else:
        fp32 = work / "fp32.onnx"
        _optimize(raw, fp32, "basic" if options.optimize != "none" else "none")
    got = _run(_session(fp32), batches)
    diff = max(float(abs(g - w).max()) if g.size else 0.0 for g, w in zip(got, wanted))
    shapes = [(g.shape, w.shape) for g, w in zip(got, wanted) if g.shape != w.shape]
    if shapes or not math.isfinite(diff) or diff > FP32_ATOL:
        what = f"shapes {shapes[0][0]} vs {shapes[0][1]}" if shapes else f"max |delta logit| {diff:.3g}"
        raise ValueError(f"ONNX Runtime's logits differ from PyTorch's ({what} > {FP32_ATOL:g}) on the check batches; "
                         "nothing was written. The model's forward probably branches on its input in Python, which "
                         "tracing freezes; try another example batch or opset, or report the architecture")
    rows = sum(int(w.shape[0]) for w in wanted)
    check = {"rows": rows, "lengths": [int(b["input_ids"].shape[1]) for b in batches], "tolerance": FP32_ATOL,
             "max_abs_diff_fp32": diff}
    if options.quantize == "int8":
        quantized = work / "int8.onnx"
        _quantize(fp32, quantized)
        _optimize(quantized, target, options.optimize)
        q = _run(_session(target), batches)
        check.update(_agreement(q, got, batches))
    return {"format": 1, "model_file": MODEL_FILE, "opset": options.opset, "optimize": options.optimize,
            "quantize": options.quantize, "inputs": [i.name for i in _session(target).get_inputs()],
            "output": "logits", "output_axes": ["batch", "sequence", "vocab"] if len(out_axes) == 2 else
            ["batch", "labels"], "check": check, "exporter": "torch.onnx.export(dynamo=False)",
            "versions": _versions()}


_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def _optimize(src: Path, dst: Path, level: str) -> None:
    """``src`` optimised by ONNX Runtime at ``level`` (``SessionOptions.optimized_model_filepath``), to ``dst``."""
    _, ort = require_extra()
    if level == "none":
        shutil.copyfile(src, dst)
        return
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3  # ORT warns that an "all" model fits this machine only: the docs say so
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


class _QuietPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _quantize(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation (weights int8, activations quantised per batch) of the fp32 graph ``src``.

    Nodes with an empty weight (a block shrunk to no head: ``[d_model, 0]``, ``[0, d_model]``) stay fp32: they compute
    nothing, and ONNX Runtime 1.32's ``MatMulInteger`` with an empty inner dimension returns uninitialised memory
    instead of zeros. ONNX Runtime's pre-processing (``quant_pre_process``) is not run: its symbolic shape inference
    fails on BERT's traced graph, and the plain graph quantises the same matrix products. Its log line recommending
    it is dropped.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    empty = {t.name for t in graph.initializer if 0 in t.dims}
    keep_fp32 = [n.name for n in graph.node if empty.intersection(n.input)]
    quiet = _QuietPreprocessHint()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=keep_fp32)
    finally:
        root.removeFilter(quiet)


def _session(path: Path, threads: int | None = None, level: str = "none"):
    _, ort = require_extra()
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(session, batch: Mapping[str, torch.Tensor]) -> dict:
    """The session's inputs from ``batch`` (int64 numpy); an input the trace dropped (unused) is not fed."""
    return {i.name: batch[i.name].detach().to("cpu", torch.long).numpy() for i in session.get_inputs()}


def _run(session, batches: list[dict]) -> list:
    return [session.run(["logits"], _feed(session, b))[0] for b in batches]


def _agreement(quantized: list, fp32: list, batches: list[dict]) -> dict:
    """Argmax agreement of the int8 and fp32 logits over rows (over real tokens for ``[batch, seq, vocab]``)."""
    import numpy as np

    same, total, diff = 0, 0, 0.0
    for q, f, b in zip(quantized, fp32, batches):
        agree = q.argmax(-1) == f.argmax(-1)
        if agree.ndim == 2:
            agree = agree[b["attention_mask"].cpu().numpy().astype(bool)]
        same, total = same + int(agree.sum()), total + int(agree.size)
        diff = max(diff, float(np.abs(q - f).max()) if q.size else 0.0)
    agreement = same / max(total, 1)
    if agreement < 0.9:
        log.warning("int8 export: the argmax of the int8 graph agrees with fp32 on only %.1f%% of %d check rows; "
                    "measure its accuracy on the task before shipping it", 100 * agreement, total)
    return {"int8_argmax_agreement": agreement, "int8_rows": total, "int8_max_abs_diff_vs_fp32": diff}


def _versions() -> dict:
    import transformers

    onnx, ort = require_extra()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}


def _describe(model: nn.Module, hf: nn.Module, task_model: bool) -> dict:
    """What the logits mean: the model class, label names, regression or not, per-block widths."""
    config = hf.config
    if task_model:
        labels, regression = list(model.info.label_names), bool(model.info.regression)
        architecture = f"TaskModel({type(hf).__name__}, task={model.task!r})"
    else:
        id2label = getattr(config, "id2label", None) or {}
        labels = [id2label[i] for i in sorted(id2label)] if id2label else None
        regression = getattr(config, "problem_type", None) == "regression"
        architecture = type(hf).__name__
    return {"architecture": architecture, "model_type": config.model_type, "labels": labels,
            "regression": regression, "widths": getattr(config, "taskprune_widths", None)}


# ---------------------------------------------------------------------------------------------------- load
class OnnxModel:
    """An ONNX Runtime session called like the PyTorch model: ``runner(**batch).logits`` (a torch tensor on the CPU).

    Batch keys the graph has no input for (``labels``, ``idx``) are ignored; a missing ``attention_mask`` is all
    ones, a missing ``token_type_ids`` all zeros. ``session`` is the ``onnxruntime.InferenceSession``, ``info`` the
    folder's ``onnx.json``.
    """

    def __init__(self, session, info: dict):
        self.session, self.info = session, info
        self.input_names = [i.name for i in session.get_inputs()]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, **ignored):
        from transformers.modeling_outputs import SequenceClassifierOutput

        ids = torch.as_tensor(input_ids)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids) if attention_mask is None else
                 torch.as_tensor(attention_mask), "token_type_ids": torch.zeros_like(ids) if token_type_ids is None
                 else torch.as_tensor(token_type_ids)}
        logits = self.session.run(["logits"], _feed(self.session, batch))[0]
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))

    def __repr__(self) -> str:
        return (f"OnnxModel({self.info.get('architecture')}, {self.info.get('quantize') or 'fp32'}, "
                f"inputs={self.input_names})")


def load_onnx(folder: str | os.PathLike, *, threads: int | None = None,
              optimize: Optimize = "all") -> tuple[OnnxModel, object | None]:
    """``(runner, tokenizer)`` for a folder written by :func:`save_onnx` (tokenizer ``None`` if none was saved).

    Args:
        folder: the folder.
        threads: ONNX Runtime's intra-op threads (default: ONNX Runtime's choice, one per physical core).
        optimize: the graph optimisation the session applies when it starts (default ``all``, on top of what
            the file was saved with).

    ``runner.session`` is the ``onnxruntime.InferenceSession`` (CPU). Raises ``FileNotFoundError`` for a missing
    folder or file and ``ValueError`` for an unreadable ``onnx.json``.
    """
    if optimize not in OPTIMIZE:
        raise ValueError(f"optimize={optimize!r}; allowed: {list(OPTIMIZE)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    require_extra()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no ONNX folder at {str(folder)!r}; pass the folder given to save_onnx")
    for name in (INFO_FILE, MODEL_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder / name)!r} is missing; {str(folder)!r} is not a complete folder "
                                    "written by taskprune.deploy.save_onnx")
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(folder / INFO_FILE)!r} is not a JSON object written by save_onnx ({e})") from None
    session = _session(folder / MODEL_FILE, threads, optimize)
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    return OnnxModel(session, info), tokenizer


__all__ = ["save_onnx", "load_onnx", "OnnxModel", "OnnxOptions", "require_extra", "OPTIMIZE", "QUANTIZE", "FP32_ATOL"]
