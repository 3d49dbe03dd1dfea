"""Configs kvsqueeze must read right: sliding windows without `layer_types`, multi-head attention without
`num_key_value_heads`, and layer indices a user gives (issue 9, items 5, 7, 12)."""

import pytest
import torch
from click.testing import CliRunner

import kvsqueeze as kq
from kvsqueeze.cli import main

from conftest import kv, tiny_llama


# --- item 12: layer indices are checked against the model ---------------------------------------------------------
def _tiny_model_dir(path, layers=4, model=None):
    """A tiny Llama plus a word-level tokenizer saved as a local model directory (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)}
    vocab["<unk>"] = 100
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="w0")
    (model if model is not None else tiny_llama(layers=layers)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["knorm", "snapkv", "pyramidkv", "streaming_llm"])
@pytest.mark.parametrize("bad", [(4,), (0, 99)])
def test_exempt_layers_out_of_range_are_refused_naming_the_range(method, bad):
    model = tiny_llama(layers=4)
    m = kq.get_method(method, compression_ratio=0.5, exempt_layers=bad)
    with pytest.raises(kq.KVSqueezeError, match=r"layer indices must be in 0\.\.3 \(the model has 4 layers\)"):
        kq.CompressedCache(model, m)
    kq.CompressedCache(model, kq.get_method(method, compression_ratio=0.5, exempt_layers=(0, 3)))  # in range: accepted


@pytest.mark.parametrize("quant", ["kivi-2", "mikv-8-2", "zipcache-4-2"])
def test_exempt_layers_are_checked_through_quantization_wrappers(quant):
    from kvsqueeze.methods import for_storage
    from kvsqueeze.quant import parse_quant

    spec = parse_quant(quant)
    m = for_storage(kq.get_method("knorm", compression_ratio=0.5, exempt_layers=(7,)), spec)
    with pytest.raises(kq.KVSqueezeError, match=r"exempt layers 7: layer indices must be in 0\.\.3"):
        kq.CompressedCache(tiny_llama(layers=4), m, layer_factory=spec.layer_factory)


@pytest.mark.parametrize("selector", ["Quest", "AttentionPredictor"])
def test_selector_dense_layers_out_of_range_are_refused(selector):
    from kvsqueeze import selection

    sel = getattr(selection, selector)(64, dense_layers=(0, 5))
    with pytest.raises(kq.KVSqueezeError, match=r"dense layers 5: layer indices must be in 0\.\.3"):
        kq.CompressedCache(tiny_llama(layers=4), None, selector=sel)


def test_negative_or_non_integer_layer_indices_are_refused():
    from kvsqueeze.selection import Quest

    with pytest.raises(kq.KVSqueezeError, match="negative indices are not supported"):
        kq.get_method("knorm", compression_ratio=0.5, exempt_layers=(-1,))
    with pytest.raises(kq.KVSqueezeError, match="negative indices are not supported"):
        Quest(64, dense_layers=(0, -2))
    with pytest.raises(kq.KVSqueezeError, match="must be layer indices"):
        kq.get_method("knorm", compression_ratio=0.5, exempt_layers=("a",))


def test_cli_exempt_layers_out_of_range_exits_2_with_one_line(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model")
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(" ".join(f"w{i % 100}" for i in range(60)))
    args = ["generate", "--model", str(model_dir), "--context-file", str(ctx), "--question", "w1 w2",
            "--max-new-tokens", "2"]
    r = CliRunner().invoke(main, args + ["--exempt-layers", "99"])
    assert r.exit_code == 2, r.output
    err = [line for line in r.output.splitlines() if line.strip()]
    assert err == ["error: exempt layers 99: layer indices must be in 0..3 (the model has 4 layers)"]
    r = CliRunner().invoke(main, args + ["--exempt-layers", "-1"])
    assert r.exit_code == 2 and "negative indices are not supported" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["--exempt-layers", "0,3"])
    assert r.exit_code == 0, r.output


# --- a reference: eager attention over a full cache, masked by position (causal, sliding window, evicted) --------
_REF = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention over every token ever seen, allowing a key iff it is causal, inside the layer's sliding window
    (`_REF["window"]`) and was still kept by the compressed run before this forward (`_REF["kept"]`)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    b, hq, q, _ = query.shape
    hk, n = key.shape[1], key.shape[-2]
    g = hq // hk
    logits = query.float() @ key.float().repeat_interleave(g, dim=1).transpose(-1, -2) * scaling
    q_pos = torch.arange(n - q, n)[:, None]
    k_pos = torch.arange(n)[None, :]
    allowed = (k_pos <= q_pos).expand(b, hk, q, n).clone()
    window = _REF["window"][module.layer_idx]
    if window:
        allowed &= k_pos > q_pos - window
    kept = _REF["kept"][module.layer_idx]  # (b, hk, n_kept) positions held before this forward, or None
    if kept is not None:
        held = torch.zeros(b, hk, n, dtype=torch.bool)
        held.scatter_(2, kept.long(), True)
        held[:, :, n - q:] = True
        allowed &= held[:, :, None, :]
    logits = logits.masked_fill(~allowed.repeat_interleave(g, dim=1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = probs @ value.float().repeat_interleave(g, dim=1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("kvsq_cfg_ref", _reference_attention)
    AttentionMaskInterface.register("kvsq_cfg_ref", eager_mask)


_register_reference()


def _chunks(sizes, seed=1, vocab=101):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, s), generator=g) for s in sizes]


def _windows(model):
    """Per layer: the sliding window the model applies (None: full attention)."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
    w = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) is not False else None
    return [w if (t == "sliding_attention" or (t is None and w)) else None for t in types]


def _compare_with_reference(model, method, sizes, prefill_chunks=1, atol=2e-5):
    """Run `sizes` chunks through a compressed cache (the first `prefill_chunks` compressed as prefill), then the
    same chunks through a full DynamicCache with kept/out-of-window/future tokens masked; logits must match."""
    import copy

    from transformers import DynamicCache
    from kvsqueeze.storage import CompressedLayer

    ref_model = copy.deepcopy(model)
    cache = kq.CompressedCache(model, method)
    chunks = _chunks(sizes)
    got, snaps = [], []
    for i, ids in enumerate(chunks):
        snaps.append({li: (layer.positions.clone() if isinstance(layer, CompressedLayer) and layer.is_initialized
                           else None) for li, layer in enumerate(cache.layers)})
        with torch.no_grad():
            if i < prefill_chunks:
                with cache.prefill():
                    got.append(model(ids, **kv(cache)).logits)
            else:
                got.append(model(ids, **kv(cache)).logits)
    ref_model.set_attn_implementation("kvsq_cfg_ref")
    dyn = DynamicCache()  # full layers: every token stays, the reference masks by position
    _REF["window"] = _windows(model)
    for i, ids in enumerate(chunks):
        _REF["kept"] = snaps[i]
        with torch.no_grad():
            ref = ref_model(ids, **kv(dyn)).logits
        torch.testing.assert_close(got[i], ref, atol=atol, rtol=1e-4)
    return cache


# --- item 7: configs without num_key_value_heads (multi-head attention), other families ---------------------------
def _family(name):
    import transformers as T

    small = dict(vocab_size=101, num_attention_heads=4)
    configs = {
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_positions=256, bos_token_id=0, eos_token_id=0, **small),
        "gpt2_layer_scaled": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_positions=256, bos_token_id=0,
                                                  eos_token_id=0, scale_attn_by_inverse_layer_idx=True, **small),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            bos_token_id=0, eos_token_id=0, **small),
        "phi": lambda: T.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, **small),
        "falcon": lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, bos_token_id=0, eos_token_id=0,
                                         **small),
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, word_embed_proj_dim=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=1, **small),
        "qwen2": lambda: T.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_key_value_heads=2, **small),
        "mistral": lambda: T.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_key_value_heads=2, head_dim=16, sliding_window=None, **small),
        "mistral_no_head_dim": lambda: T.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                       num_key_value_heads=2, head_dim=None, sliding_window=None,
                                                       **small),
    }
    cfg = configs[name]()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


FAMILIES = ["gpt2", "gpt2_layer_scaled", "gpt_neox", "phi", "falcon", "opt", "qwen2", "mistral",
            "mistral_no_head_dim"]


@pytest.mark.parametrize("method", ["knorm", "snapkv", "h2o"])
@pytest.mark.parametrize("family", FAMILIES)
def test_model_families_work_or_are_refused_with_one_line(family, method):
    """Every family either matches the masked full-cache reference or is refused by one KVSqueezeError
    (never AttributeError or a shape error deep inside)."""
    model = _family(family)
    m = kq.get_method(method, compression_ratio=0.5, **({"window": 4} if method == "snapkv" else {}))
    try:
        kq.CompressedCache(model, m)
    except kq.KVSqueezeError as e:
        assert family == "falcon", f"{family} refused: {e}"  # Falcon has no AttentionInterface path
        assert "\n" not in str(e)
        return
    cache = _compare_with_reference(model, m, [40, 5, 1, 1])
    cfg = model.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for layer in cache.layers:
        assert layer.keys.shape[1] == n_kv
        assert layer.n_stored < cache.get_seq_length()  # compressed


def test_multi_head_attention_config_reads_as_gqa_with_one_group():
    from transformers import GPT2Config, GPTNeoXConfig, OPTConfig

    from kvsqueeze.shapes import attention_shape

    assert attention_shape(GPT2Config(n_embd=64, n_head=4)) == (4, 4, 16)
    assert attention_shape(GPTNeoXConfig(hidden_size=96, num_attention_heads=3)) == (3, 3, 32)
    assert attention_shape(OPTConfig(hidden_size=64, num_attention_heads=8)) == (8, 8, 8)


def test_cli_runs_a_gpt2_model_dir(tmp_path):
    """GPT-2 (no num_key_value_heads) through the CLI: no traceback, the memory line reports compression."""
    model = _family("gpt2")
    path = _tiny_model_dir(tmp_path / "gpt2", model=model)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(" ".join(f"w{i % 100}" for i in range(60)))
    r = CliRunner().invoke(main, ["generate", "--model", str(path), "--context-file", str(ctx), "--question", "w1",
                                  "--max-new-tokens", "2", "--method", "knorm", "--compression-ratio", "0.5"])
    assert r.exit_code == 0, r.output
    assert "(50.0%, 2.00x smaller)" in r.output


# --- item 5: sliding_window without layer_types (Mistral, Phi-3), Qwen2's switch, Gemma 3 ----------------------
def _sliding(family, window, attn="sdpa"):
    import transformers as T

    small = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    cfg = {
        "mistral": lambda: T.MistralConfig(head_dim=16, sliding_window=window, **small),
        "phi3": lambda: T.Phi3Config(sliding_window=window, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                     **small),
        "qwen2": lambda: T.Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=0,
                                       **small),
    }[family]()
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["knorm", "snapkv", "h2o", "pyramidkv"])
@pytest.mark.parametrize("window", [16, 4096])  # smaller and larger than the prompt
@pytest.mark.parametrize("prefill_chunks", [1, 2])
def test_sliding_window_layers_are_compressed_and_match_reference(attn, method, window, prefill_chunks):
    """Mistral (sliding_window, no layer_types): every layer compressed inside its window; logits equal a full
    cache with the evicted and the out-of-window tokens masked (chunked prefill, an appended chunk, decoding)."""
    model = _sliding("mistral", window, attn)
    if method == "pyramidkv":
        m = kq.methods.PyramidKV(scorer=kq.methods.SnapKV(window=4), compression_ratio=0.5, beta=4)
    else:
        m = kq.get_method(method, compression_ratio=0.5, **({"window": 4} if method == "snapkv" else {}))
    sizes = [40, 25][:prefill_chunks] + [5, 1, 1, 1]
    cache = _compare_with_reference(model, m, sizes, prefill_chunks)
    assert cache.is_sliding == [True, True]
    for layer in cache.layers:
        inside = (layer.positions >= cache.get_seq_length() - (window - 1)).sum(-1)
        assert layer.n_stored == int(inside.max())  # nothing a later query cannot see, beyond the fullest head's


@pytest.mark.parametrize("family", ["mistral", "phi3", "qwen2"])
@pytest.mark.parametrize("window,prompt", [(4096, 40), (16, 40), (32, 90)])
@pytest.mark.parametrize("compression_ratio", [0.5, 0.75])
def test_sliding_window_ratio_asked_is_ratio_held(family, window, prompt, compression_ratio):
    """K-norm at `compression_ratio` on a prompt keeps int(held * (1 - compression_ratio)) of the `held` tokens a full
    cache holds (all of them, or the window's last window - 1), and the stats say so in bytes."""
    model = _sliding(family, window)
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=compression_ratio))
    with torch.no_grad():
        model(_chunks([prompt])[0], **kv(cache))
    held = min(prompt, window - 1)
    kept = int(held * (1 - compression_ratio))
    st = cache.stats()
    assert st.tokens_stored == [kept, kept]
    d = kq.shapes.attention_shape(model.config)[2]
    assert st.kv_bytes == sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys,
                                                                                                layer.values))
    assert st.full_kv_bytes == 2 * 2 * 1 * 2 * held * d * 4  # layers x (k, v) x batch x kv heads x tokens x d x fp32
    assert st.kept_fraction == pytest.approx(kept / held)
    assert st.tokens_seen == prompt


def test_no_compression_on_a_sliding_config_is_bit_identical_to_dynamic_cache():
    import copy

    from transformers import DynamicCache

    model = _sliding("mistral", 16)
    ref_model = copy.deepcopy(model)
    dyn, cache = DynamicCache(config=model.config), kq.CompressedCache(model, None)
    for ids in _chunks([40, 5, 1, 1, 20, 1]):
        with torch.no_grad():
            assert torch.equal(model(ids, **kv(cache)).logits, ref_model(ids, **kv(dyn)).logits)
    assert cache.stats().tokens_stored == [layer.keys.shape[-2] for layer in dyn.layers] == [15, 15]


def test_qwen2_sliding_switch_off_is_full_attention():
    from transformers import Qwen2Config

    from kvsqueeze.runtime.cache import layer_types_of

    small = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    cfg = Qwen2Config(use_sliding_window=False, sliding_window=4096, **small)
    assert layer_types_of(cfg) == ["full_attention"] * 2
    cfg.sliding_window, cfg.layer_types = 4096, None  # a raw config as older code paths leave it
    assert layer_types_of(cfg) == ["full_attention"] * 2
    cfg.use_sliding_window = True
    assert layer_types_of(cfg) == ["sliding_attention"] * 2


def test_gemma3_sliding_layers_match_reference():
    from conftest import tiny_gemma3

    model = tiny_gemma3()
    cache = _compare_with_reference(model, kq.get_method("snapkv", compression_ratio=0.5, window=4), [40, 25, 5, 1, 1], 2)
    assert cache.is_sliding == [True, False, True, False]
    st = cache.stats()
    assert max(st.tokens_stored[0], st.tokens_stored[2]) <= 7


@pytest.mark.parametrize("quant", ["kivi-2", "gear-4", "mikv-8-2", "zipcache-4-2"])
def test_quantized_sliding_layers_hold_only_the_window(quant):
    from kvsqueeze.methods import for_storage
    from kvsqueeze.quant import parse_quant

    spec = parse_quant(quant)
    model = _sliding("mistral", 48)
    cache = kq.CompressedCache(model, for_storage(kq.get_method("knorm", compression_ratio=0.5), spec),
                               layer_factory=spec.layer_factory)
    ids = _chunks([200])[0]
    with torch.no_grad():
        with cache.prefill():
            model(ids, **kv(cache))
        for _ in range(3):
            model(ids[:, :1], **kv(cache))
    for layer in cache.layers:
        assert layer.n_stored <= 47
        inside = (layer.positions >= cache.get_seq_length() - 47).sum(-1)
        assert layer.n_stored == int(inside.max())
