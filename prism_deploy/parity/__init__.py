"""Parity checks of the deployed pieces against their PyTorch references."""
