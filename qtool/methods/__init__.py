"""Methods: one file each; a method quantizes a float weight through the codec it is given.

`METHODS` are weight methods (the last step of a plan rule); `TRANSFORM_ONLY` are float rewrites that run
before one (`method: [smoothquant, rtn]`); AWQ is both (its scaling is a transform, its clip search the
weight step).
"""

from qtool.methods import awq, gptq, hqq, rtn, smoothquant

METHODS = {"rtn": rtn, "gptq": gptq, "awq": awq, "hqq": hqq}
TRANSFORM_ONLY = {"smoothquant": smoothquant}
# files that are a part of one method, not a method: `<method>_<part>.py` -> the method they serve
PARTS = {"gptq_blocks": "gptq"}  # GPTQ's sweep through the GGUF block grids
