"""Inputs: NIH metadata, DICOM, image readers, NIH-style CSVs, pseudonyms, source scans."""
