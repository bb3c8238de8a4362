"""Phantom chest X-rays in the NIH layout: a data source for the demo and the tests."""
