"""Inference-time use of merge outputs: a training-free router and weight specialization.

    from pacer_stream.runtime import RouterBank, SplitMergeModel, default_embedder_path

    bank = RouterBank.load("out/router")                   # built by `pacer-stream router build`
    sm = SplitMergeModel.load("out/split")                 # μ once, η, c_t
    with sm.for_text(prompt, bank, temperature=0.5, top_k=2) as c:
        logits = sm.model(**tokenizer(prompt, return_tensors="pt")).logits

transformers is imported only when a model or an embedder is actually loaded.
"""

from .embedder import Embedder, default_embedder_path
from .router import RouterBank, read_samples, route_weights
from .split_merge import SplitMergeModel, TaskVectorModel
from .split_output import load_eta, read_info

__all__ = ["Embedder", "RouterBank", "default_embedder_path", "read_samples", "route_weights",
           "SplitMergeModel", "TaskVectorModel", "load_eta", "read_info"]
