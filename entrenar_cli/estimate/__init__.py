"""Internals of the memory estimator; the public API is :mod:`entrenar_cli.memory`.

``layout``   which Linear / Embedding modules a config builds (analytic for the catalogue, meta device
             otherwise), the basis of exact parameter counts, NF4 sizes and LoRA counts.
``training`` the training-memory model: weights, gradients, optimizer state, saved activations,
             logits, teacher, and the peak over the phases of a training step.
``sources``  turning a user's model argument (catalogue name, directory, .gguf, Hub id) into a config.
"""
