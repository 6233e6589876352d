"""transformers' own ``ModelTesterMixin`` (``tests/test_modeling_common.py`` of the installed version's sdist) on
SLAB-LLaMA, and, run the same way for comparison, on transformers' ``LlamaForCausalLM``.

The model tester mirrors transformers' ``CausalLMModelTester`` (the one ``tests/models/llama`` uses): the same tiny
sizes and inputs, a base model and a causal-LM head. The sdist does not ship ``tests/generation`` and
``tests/exporters``, which ``test_modeling_common`` imports; they are replaced by empty mixins, so the generation and
``torch.export`` tests are not part of this run (``generate`` is tested in ``test_lm_model.py``).

``make peer-test-transformers`` runs this file; ``make test`` collects it too. Without network access and without a
cached copy of the sdist the module is skipped, saying so.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import unittest
from unittest import mock

import pytest

from peer_sdist import PeerTestsUnavailable, load_peer_tests

_STUBS = {
    "generation/test_utils.py": (
        '"""Not shipped in the transformers sdist: its generate() tests do not run here."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"),
    "exporters/test_export.py": (
        '"""Not shipped in the transformers sdist: its torch.export tests do not run here."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"),
}

try:
    _PACKAGE = load_peer_tests("transformers", "transformers_peer_tests", stubs=_STUBS)
except PeerTestsUnavailable as exc:
    pytest.skip(f"transformers' test suite unavailable: {exc}", allow_module_level=True)

common = importlib.import_module(f"{_PACKAGE}.test_modeling_common")

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

import slab.lm  # noqa: E402,F401  (registers slab_llama with the Auto classes)
from slab.lm import SlabLlamaConfig, SlabLlamaForCausalLM, SlabLlamaModel  # noqa: E402


class CausalLMTester:
    """Config and inputs for the common tests: transformers' ``CausalLMModelTester`` defaults (batch 13 of 7 tokens,
    vocabulary 99, 2 layers of width 32, a lower-triangular attention mask so rows have 1 to 7 real tokens)."""

    config_class = None
    config_overrides: dict = {}

    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37,
                 hidden_act="gelu", max_position_embeddings=512, initializer_range=0.02, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.head_dim = hidden_size // num_attention_heads

    def get_config(self):
        names = [n for n in inspect.signature(LlamaConfig.__init__).parameters if n != "self"]
        kwargs = {n: getattr(self, n) for n in names if hasattr(self, n)}
        kwargs.update(pad_token_id=self.pad_token_id, **self.config_overrides)
        return self.config_class(**kwargs)

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = common.torch.tril(common.torch.ones_like(input_ids))
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class LlamaTester(CausalLMTester):
    config_class = LlamaConfig


class SlabLlamaTester(CausalLMTester):
    """The default SLAB-LLaMA: PRepBN with the authors' LM initialisation (RepBN alpha 0, BN affine 0), at
    construction (lam = 1, the start of the schedule)."""

    config_class = SlabLlamaConfig
    config_overrides = {"norm": "prepbn"}


class SlabLlamaIdentityBranchTester(SlabLlamaTester):
    """PRepBN whose RepBN branch starts as the identity (alpha 1): an eval-mode model that depends on its input."""

    config_overrides = {"norm": "prepbn", "repbn_alpha_init": 1.0}


class SlabLlamaRMSNormTester(SlabLlamaTester):
    """The baseline norm (the same function as LLaMA): our model code with a normalised residual stream."""

    config_overrides = {"norm": "rmsnorm"}


class SlabLlamaFusedTester(SlabLlamaTester):
    """The deploy form that slab.fuse returns and from_pretrained rebuilds: no norm, biased consumers, untied head."""

    config_overrides = {"norm": "none", "folded_bias": True, "tie_word_embeddings": False}


def expected_failure(name: str, reason: str):
    """The common test ``name``, expected to fail (strictly: it must fail) for ``reason``."""
    inherited = getattr(common.ModelTesterMixin, name)

    @pytest.mark.xfail(strict=True, reason=reason)
    @functools.wraps(inherited)
    def test(self, *args, **kwargs):
        # pytest reports a failing subTest apart from its test, which then counts as passed: without subtests the
        # expected failure reaches the test itself.
        with mock.patch.object(self, "subTest", lambda *_, **__: contextlib.nullcontext()):
            return inherited(self, *args, **kwargs)

    return test


#: Fails on transformers' LlamaForCausalLM too, so on every model run here.
NO_GENERATION_TESTS = ("the sdist ships no tests/generation, so these testers cannot inherit the real "
                       "GenerationTesterMixin; this check says that generate() tests are missing")
#: An eval-mode PRepBN at the authors' LM initialisation is RepBN with alpha 0 and BN affine 0: the zero map. Every
#: norm outputs 0, so the last hidden state and the logits are constants and no output can change with the RoPE
#: parameters or the targets. These tests pass once the RepBN branch is not the zero map (identity-branch class).
ZERO_MAP_AT_INIT = "eval-mode PRepBN at the authors' LM init is the zero map: outputs do not depend on the input"
#: Without a norm that rescales the residual stream (eval-mode RepBN starting as the identity, the fused form), a
#: model at LLaMA's init scale (std 0.02) has attention logits of ~1e-5: the softmax is uniform to within 1e-8 and
#: RoPE, scaled or not, moves the outputs by ~4e-9, below the test's 1e-5. Its norm='rmsnorm' twin moves them by 9e-3.
NO_NORM_AT_INIT = "no rescaling norm at init: attention is uniform, so RoPE scaling moves outputs by ~4e-9 < 1e-5"


class _ContractTest(common.ModelTesterMixin):
    model_tester_class = None

    def setUp(self):
        self.model_tester = self.model_tester_class(self)

    test_generation_tester_mixin_inheritance = expected_failure("test_generation_tester_mixin_inheritance",
                                                                NO_GENERATION_TESTS)


@common.require_torch
class LlamaContractTest(_ContractTest, unittest.TestCase):
    """transformers' own LLaMA, run the same way: the reference for which failures are the suite's, not ours."""

    model_tester_class = LlamaTester
    all_model_classes = (LlamaModel, LlamaForCausalLM)


class _SlabLlamaContractTest(_ContractTest):
    all_model_classes = (SlabLlamaModel, SlabLlamaForCausalLM)

    @classmethod
    def setUpClass(cls):
        # The common tests find "the base model" and "the causal-LM heads" by class name in transformers' tables of
        # in-library models, which AutoModel.register() leaves alone; without our names there, the RoPE-scaling and
        # shift_labels tests would skip instead of running. Listed for this class's tests only.
        cls._auto_names = [
            mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {SlabLlamaConfig.model_type: SlabLlamaModel.__name__}),
            mock.patch.dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                            {SlabLlamaConfig.model_type: SlabLlamaForCausalLM.__name__}),
        ]
        for patch in cls._auto_names:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in cls._auto_names:
            patch.stop()


def _rope_scaling_expected_to_fail(reason: str) -> dict:
    names = [n for n in dir(common.ModelTesterMixin) if n.startswith("test_model_rope_scaling_from_config_")]
    return {name: expected_failure(name, reason) for name in names}


@common.require_torch
class SlabLlamaContractTest(_SlabLlamaContractTest, unittest.TestCase):
    model_tester_class = SlabLlamaTester

    test_causal_lm_loss_honors_shift_labels = expected_failure("test_causal_lm_loss_honors_shift_labels",
                                                               ZERO_MAP_AT_INIT)
    locals().update(_rope_scaling_expected_to_fail(ZERO_MAP_AT_INIT))


@common.require_torch
class SlabLlamaIdentityBranchContractTest(_SlabLlamaContractTest, unittest.TestCase):
    model_tester_class = SlabLlamaIdentityBranchTester

    locals().update(_rope_scaling_expected_to_fail(NO_NORM_AT_INIT))


@common.require_torch
class SlabLlamaRMSNormContractTest(_SlabLlamaContractTest, unittest.TestCase):
    model_tester_class = SlabLlamaRMSNormTester


@common.require_torch
class SlabLlamaFusedContractTest(_SlabLlamaContractTest, unittest.TestCase):
    model_tester_class = SlabLlamaFusedTester

    locals().update(_rope_scaling_expected_to_fail(NO_NORM_AT_INIT))
