import pytest
import torch
from transformers import Gemma3TextConfig, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM

from kvsqueeze.compat import CACHE_ARG


def kv(cache):
    """The cache as the keyword the installed transformers takes (`cache=` from 5.24, `past_key_values=` before):
    `model(ids, **kv(cache))`, `model.generate(ids, **kv(cache))`."""
    return {CACHE_ARG: cache}


def tiny_llama(attn="sdpa", layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed=0):
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=1024, attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    import kvsqueeze as kq

    try:
        return kq.load_model("smollm2-135m")
    except kq.KVSqueezeError as e:  # the package is installed by `make test`; say so if it is not
        pytest.fail(str(e))
