"""Supernets and fixed networks. Supernets never hold architecture parameters."""
