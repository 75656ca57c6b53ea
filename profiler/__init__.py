"""The event contract: schema, recorder, sinks and the benchmark runner.

Imports nothing from `hybrid` or `analysis`; both of those import this.
"""
