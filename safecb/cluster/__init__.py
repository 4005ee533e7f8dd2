"""Where the Ray side runs: connecting to a local or existing cluster."""
