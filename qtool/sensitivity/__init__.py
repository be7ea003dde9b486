"""`qtool sensitivity`: per-tensor quantization cost measurement and the budgeted mix solver (`solve.py`)."""
