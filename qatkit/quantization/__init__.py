"""The quantization workflow: float model -> fuse -> prepare -> calibrate -> QAT -> convert.

Stubs and FloatFunctional mark the deploy region (``stubs``); qconfigs say how each op is
quantized (``qconfig``, ``observers``); fake quants simulate it (``fake_quant``); the data-flow
trace (``trace``) finds fusion patterns and the region; ``fuse``/``fused`` fold BN; ``qat``
holds the QAT modules; ``registry`` is the one operator table; ``prepare``, ``calibrate``,
``convert``, ``evaluate`` and ``checkpoint`` are the steps. The workflow announces its moments
through ``qatkit.base.hooks``; it never imports the doctor or distributed code that listens.
"""
