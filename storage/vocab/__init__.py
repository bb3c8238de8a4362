"""Shared vocabulary: the findings, the letterbox geometry and input errors.

Both ``miner`` and the rest of ``storage`` import these; nothing here reads a file.
"""
