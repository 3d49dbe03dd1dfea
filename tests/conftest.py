import contextlib
import os

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


def prefixkv_profiles(layers: int, n: int = 64, seed: int = 0) -> torch.Tensor:
    """PrefixKV calibration profiles (2 samples, `layers`, n) made from random importance whose concentration
    differs by layer (no calibration run, no file)."""
    from kvsqueeze.methods.prefixkv import cumulative_profiles

    gen = torch.Generator().manual_seed(seed)
    power = torch.linspace(1.0, 8.0, layers)[None, :, None]
    return cumulative_profiles(torch.rand(2, layers, n, generator=gen) ** power).float()


class Spy:
    """Wraps a selector and records what it returns: `calls` = [(layer_idx, slots stored, idx or None)]."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):  # budget, page, dense_layers, predict_next ...: the inner selector's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def setup(self, model):
        self.inner.setup(model)

    def observe(self, *a):
        self.inner.observe(*a)

    def select(self, layer_idx, layer, query):
        idx = self.inner.select(layer_idx, layer, query)
        self.calls.append((layer_idx, layer.n_stored, idx))
        return idx

    @property
    def picks(self) -> dict:
        """(layer_idx, slots stored) -> the last idx returned there."""
        return {(li, n): idx for li, n, idx in self.calls}


def save_tiny_llama_with_smollm2_tokenizer(d):
    """Save a tiny random Llama with SmolLM2's tokenizer (larger init: answers depend on the cache) into the
    folder `d`, a local model directory `kq.load_model(str(d))` reads; returns `d`."""
    import kvsqueeze as kq
    from transformers import AutoTokenizer

    from kvsqueeze.models import cache_dir

    saved = cache_dir() / "models" / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(saved) if (saved / "tokenizer.json").exists() else kq.load_model(
        "smollm2-135m")[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, initializer_range=0.1,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@contextlib.contextmanager
def own_cache(cache_dir):
    """`$KVSQUEEZE_CACHE` at `cache_dir` (Q-Filters calibrate there) and torch on one thread (tiny matrices: more
    threads only contend) inside the block; both restored after, so other test modules keep the real cache
    (converted models, calibrated filters)."""
    old = os.environ.get("KVSQUEEZE_CACHE")
    os.environ["KVSQUEEZE_CACHE"] = str(cache_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("KVSQUEEZE_CACHE", None)
        else:
            os.environ["KVSQUEEZE_CACHE"] = old


@contextlib.contextmanager
def loaded_in_own_cache(model_dir, cache_dir):
    """`kq.load_model(model_dir)` inside `own_cache(cache_dir)`."""
    import kvsqueeze as kq

    with own_cache(cache_dir):
        yield kq.load_model(str(model_dir))


def assert_one_error_line(args, message):
    """`kvsqueeze ARGS` exits 2 with one line, `error: ...` containing `message`."""
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output


def run_bench(name, *args, timeout=600):
    """`python bench/<name>.py ARGS` with the package's src on the path: the CompletedProcess (text output)."""
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "src"))
    return subprocess.run([sys.executable, os.path.join(root, "bench", f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_needs_cuda(r, name):
    """A GPU bench run without CUDA: exit 2 and the one line `error: bench/<name>.py needs a CUDA GPU`."""
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: bench/{name}.py needs a CUDA GPU"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model directory (one per test module)."""
    return save_tiny_llama_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (tiny matrices: threads only contend)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama_d64(seed: int = 0):
    """A 2-layer random Llama with head_dim 64 (4 query / 2 kv heads): quantization groups of real width."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


@contextlib.contextmanager
def no_host_sync(device):
    """On a CUDA `device`: make any host synchronisation inside the block an error (torch's sync debug mode); a
    no-op elsewhere. The static decode step must run without one after its warm-up."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_compiled_static_step(model, make_cache, n, tol, graphs):
    """Decode `n` tokens greedily over the static copy of `make_cache()` ((prefilled CompressedCache, its first
    logits)), uncompiled and compiled (fullgraph, aot_eager): the same tokens, the logits within `tol`, `graphs`
    compiled graphs and no graph break."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from kvsqueeze.runtime.static import StaticCompressedCache, static_greedy_decode

    c1, f1 = make_cache()
    ref_logits = []
    ref = static_greedy_decode(model, StaticCompressedCache.from_cache(c1, n), f1, n, set(), logits_out=ref_logits)
    c2, f2 = make_cache()
    torch._dynamo.reset()
    counters.clear()
    logits = []
    got = static_greedy_decode(model, StaticCompressedCache.from_cache(c2, n), f2, n, set(), compile=True,
                               backend="aot_eager", logits_out=logits)
    assert got == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **tol)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
