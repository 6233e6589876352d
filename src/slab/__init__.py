"""slab: SLAB transformers (simplified linear attention + progressive re-parameterised BatchNorm).

Quick start::

    import slab
    model = slab.create_model("slab_deit_tiny_patch16_224")
    ...train; slab.PRepBNSchedule drives the LN -> BN transition...
    deploy = slab.fuse(model)           # norm-free, same function in eval
"""
from .layers.norm import PRepBN, RepBN, TokenBatchNorm, set_prepbn_lambda
from .models import AUTHORS_CHECKPOINTS, create_model, list_models, load_authors_model
from .reparam.fuse import fuse
from .schedule import PRepBNSchedule

__version__ = "0.1.0"

__all__ = ["PRepBN", "RepBN", "TokenBatchNorm", "set_prepbn_lambda", "AUTHORS_CHECKPOINTS", "create_model",
           "list_models", "load_authors_model", "fuse", "PRepBNSchedule", "__version__"]

__all__ += ["export_onnx", "SlabLlamaConfig", "SlabLlamaForCausalLM", "SlabLlamaModel"]


def __getattr__(name: str):
    # Lazy: `import slab` stays free of the ONNX tooling and of transformers.
    if name == "export_onnx":
        from .reparam.export import export_onnx
        return export_onnx
    if name in ("SlabLlamaConfig", "SlabLlamaForCausalLM", "SlabLlamaModel"):
        from . import lm
        return getattr(lm, name)
    raise AttributeError(f"module 'slab' has no attribute {name!r}")
