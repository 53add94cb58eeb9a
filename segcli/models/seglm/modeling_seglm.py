"""The native model as transformers models: `SegLMForCausalLM` (training, save_pretrained / from_pretrained, the Auto
classes) and its body `SegLMModel`, the modules and forward of `network` on transformers' `PreTrainedModel`.

Importing this module registers seglm with `AutoConfig` and `AutoModelForCausalLM` (as `from segcli.models.seglm
import SegLMForCausalLM` does). `segcli run` loads `network.SegLM` instead, without transformers' model code.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .configuration_seglm import SegLMConfig
from .network import SegLMAttention, SegLMBodyMixin, SegLMHeadMixin


class SegLMPreTrainedModel(PreTrainedModel):
    config_class = SegLMConfig
    config: SegLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["SegLMBlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SegLMAttention):
            nn.init.zeros_(module.memory_gate)
            if module.key_smear is not None:
                nn.init.zeros_(module.key_smear)  # smearing starts off: a model fine-tuned into it starts unchanged


class SegLMModel(SegLMBodyMixin, SegLMPreTrainedModel):
    def __init__(self, config: SegLMConfig):
        super().__init__(config)
        self.build_body(config)
        self.post_init()


class SegLMForCausalLM(SegLMHeadMixin, SegLMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SegLMConfig):
        super().__init__(config)
        self.model = SegLMModel(config)
        self.build_head(config)
        self.post_init()


AutoConfig.register(SegLMConfig.model_type, SegLMConfig, exist_ok=True)
AutoModelForCausalLM.register(SegLMConfig, SegLMForCausalLM, exist_ok=True)
