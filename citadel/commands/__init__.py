"""Typer sub-applications; ``citadel.cli`` wires them. Each holds argument parsing only."""
