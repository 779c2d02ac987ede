"""Spam Killer: an inbound mail filter that relays accepted mail before-queue over verified TLS."""

__version__ = "0.1.0"
