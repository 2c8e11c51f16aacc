"""The fixed-point model: the integer arithmetic of docs/fixed-point.md, nothing else.

``kernels`` are plain functions on integer tensors (one per operator, every assumption
checked); ``modules`` wrap them as the ``nn.Module`` forms that ``convert`` produces, holding
only integer parameters and the scales they were derived from; ``yuv_input`` is the deploy-time
centered-YUV444 input converter. This layer knows the base only: it does not know how its
modules were made.
"""
