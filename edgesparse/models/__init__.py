"""Models: the family registry, typed layer weights, the shared decoder and named taps."""
from .families import Family, TensorNames, architectures, family_of, register_family
from .spec import ModelSpec, spec_from_config

__all__ = ["Family", "TensorNames", "ModelSpec", "architectures", "family_of", "register_family",
           "spec_from_config"]
