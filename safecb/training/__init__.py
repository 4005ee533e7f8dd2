"""The Safe-CB math: pure torch functions, tensors in, tensors out. No Ray, no I/O, no config objects."""
