"""What tensor names mean, across architectures (no tensor is read here)."""
