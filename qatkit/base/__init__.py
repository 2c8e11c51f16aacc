"""The base: what every other part of qatkit stands on, and nothing that stands on it.

Errors and warnings (``errors``), the march table (``march``), dtypes and the quantization math
(``quant_math``: scales, rounding, ranges), the quantized tensor of the fixed-point model
(``qtensor``), colour conversions (``colour``), the named workflow moments (``hooks``), the
recorder of model execution (``recorder``), user-frame detection (``frames``) and small module
helpers (``modules``). Modules here import nothing from the rest of qatkit.
"""

VERSION = "0.1.0"
