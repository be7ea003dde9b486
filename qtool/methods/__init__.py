"""Methods: one file each; a method quantizes a float weight through the codec it is given."""

from qtool.methods import awq, gptq, hqq, rtn

METHODS = {"rtn": rtn, "gptq": gptq, "awq": awq, "hqq": hqq}
