"""Quantized KV storage on the real default model (smollm2-135m, CPU): answers and bytes, and `generate --quant`."""

import re

import pytest
from click.testing import CliRunner

import kvsqueeze as kq
from kvsqueeze.cli import main
from kvsqueeze.quant import kivi, kivi_bytes_per_token
from kvsqueeze.tasks.passkey import passkey_samples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample(smollm2):
    return passkey_samples(smollm2[1], 1, 1000, seed=3)[0]


def test_passkey_with_4bit_kivi_and_bytes_held(smollm2, sample):
    model, tok = smollm2
    res = kq.generate_answer(model, tok, sample.context, sample.question, None, max_new_tokens=12,
                             layer_factory=kivi(4))
    assert sample.answers[0] in res.answer
    n = res.n_context_tokens
    nq = (n - 32) // 32 * 32  # quantized tokens; the rest (32..63) stays in fp32 (the model's dtype on CPU)
    cfg = model.config
    per_layer = cfg.num_key_value_heads * (nq * kivi_bytes_per_token(64, 4) + (n - nq) * 2 * 64 * 4)
    assert res.stats.kv_bytes == cfg.num_hidden_layers * per_layer


def test_generate_command_with_quant(smollm2, sample, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(sample.context)
    out = CliRunner().invoke(main, ["generate", "--method", "knorm", "--compression-ratio", "0.5", "--quant", "kivi-2",
                                    "--context-file", str(ctx), "--question", sample.question,
                                    "--max-new-tokens", "12"])
    assert out.exit_code == 0, out.output
    assert "quant: kivi-2" in out.output and sample.answers[0] in out.output
    smaller = float(re.search(r"([\d.]+)x smaller", out.output).group(1))
    # half of ~1000 tokens kept; 448 of them at 48 bytes per head instead of 512 (fp32), 52 residual in fp32
    assert 9 < smaller < 11
    bad = CliRunner().invoke(main, ["generate", "--quant", "kivi-3", "--context-file", str(ctx), "--question", "q"])
    assert bad.exit_code == 2 and "error:" in bad.output
