"""safecb: Safe-CB at cluster scale.

The model judges its own images, harmful/safe pairs define a Harmful Space, the VQ codebook is
projected out of it and fine-tuned inside the harmless space, and the loop repeats.
"""

__version__ = "0.1.0"
