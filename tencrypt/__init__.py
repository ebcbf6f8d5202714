"""Tencrypt: transparent encryption of the traffic between the pods of one project."""

__version__ = "0.1.0"
