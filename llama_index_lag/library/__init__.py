"""Adapter library: read PEFT LoRA folders, validate against a base model, align spectrally, store packed."""

from .align import spectral_align
from .base import BaseModelSpec
from .peft_io import AdapterHeader, LoraModuleWeights, load_weights, read_header
from .store import AdapterLibrary, ModuleTensors

__all__ = [
    "AdapterHeader",
    "AdapterLibrary",
    "BaseModelSpec",
    "LoraModuleWeights",
    "ModuleTensors",
    "load_weights",
    "read_header",
    "spectral_align",
]
