"""Shipped configuration presets (package data)."""
