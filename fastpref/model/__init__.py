"""The model side of a step: the fused head swapped into a causal LM (``head``), packed and tree-packed token
streams with their attention masks (``tree_stream``), the errors for attention setups that would silently mix
sequences (``attention``), log-probs of tree streams (``tree_logps``), and the refinement prompt's cached
keys/values (``prefix_kv``)."""
