"""Reads timings, attributes wall time, computes bandwidth, renders results.

Never imports `hybrid` or `torch`: a report must work on a laptop without torch.
"""
