"""models.model_key: a local model folder is named by its own name, a hub id keeps its owner, and the key follows
the weights."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze.models import model_key


def _tiny(name_or_path: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    model.config._name_or_path = name_or_path
    return model


def test_local_folder_named_by_its_own_name(tmp_path):
    folder = tmp_path / "deep" / "path" / "to" / "the" / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    key = model_key(_tiny(str(folder)))
    assert key.startswith("smollm2-135m-") and len(key) == len("smollm2-135m-") + 12


def test_hub_id_keeps_its_owner_and_weights_change_the_key():
    a = _tiny("HuggingFaceTB/SmolLM2-135M-Instruct")
    key = model_key(a)
    assert key.startswith("HuggingFaceTB_SmolLM2-135M-Instruct-")
    with torch.no_grad():
        next(m for m in a.modules() if hasattr(m, "q_proj")).q_proj.weight.add_(1.0)
    assert model_key(a) != key


def test_a_file_under_the_old_key_is_renamed(tmp_path):
    from kvsqueeze.models import model_file

    folder = tmp_path / "models" / "some-model"
    folder.mkdir(parents=True)
    model = _tiny(str(folder))
    key = model_key(model)
    old_name = str(folder).replace("/", "_")[-40:] + key[key.rindex("-"):] + ".safetensors"
    store = tmp_path / "predictor"
    store.mkdir()
    (store / old_name).write_bytes(b"weights")
    path = model_file(store, model)
    assert path.name == f"{key}.safetensors" and path.read_bytes() == b"weights"
    assert not (store / old_name).exists()
    assert model_file(store, model) == path  # found under the new name from then on
