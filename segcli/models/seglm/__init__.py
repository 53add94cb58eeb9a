"""The native segment-recurrent model, registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_seglm import SegLMConfig
from .modeling_seglm import SegLMForCausalLM, SegLMOutput, SegMemory

AutoConfig.register(SegLMConfig.model_type, SegLMConfig, exist_ok=True)
AutoModelForCausalLM.register(SegLMConfig, SegLMForCausalLM, exist_ok=True)

__all__ = ["SegLMConfig", "SegLMForCausalLM", "SegLMOutput", "SegMemory"]
