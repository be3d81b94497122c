"""Exocom: a message broker for microservice fleets, with versioned deployments."""

__version__ = "0.1.0"
