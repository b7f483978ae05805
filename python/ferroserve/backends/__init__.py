"""Backends: the local Rust engine (and, later, remote ones) behind one interface."""
