"""A stand-in for Transformer Engine, for the layer-swap tests only (put on ``sys.path`` by
``tests/test_fp8.py``).

Transformer Engine needs a CUDA build of torch and an fp8 GPU, so it cannot be installed on a
CPU machine. This package has the few names ltransform uses, with TE's constructor signatures,
and plain torch math in place of the fp8 kernels; it records the fp8 autocast it is run under.
It tests ltransform's logic (which layers are swapped, with which arguments, parameters kept,
the autocast entered with the recipe), not Transformer Engine.
"""
