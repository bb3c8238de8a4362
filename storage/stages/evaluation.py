"""A run's localisation evaluation: ``evaluation.json`` and ``evaluation.md`` in its folder.

``results``: method key (``cam``, ``am-t2``, ...) -> finding -> metric (``iou``, ``ior``) ->
T -> {acc, afp}; the Markdown has the papers' layout (Cai et al., Table 5): rows T x method,
columns the boxed findings, cells "Acc-AFP".
"""

from __future__ import annotations

import math
from typing import Any

from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS
from cxr_miner.storage.vocab.text import MISSING, markdown_table

SHORT = {"Atelectasis": "AT", "Cardiomegaly": "CM", "Effusion": "PE", "Infiltration": "Infiltrat.", "Mass": "Mass",
         "Nodule": "Nodule", "Pneumonia": "PNA", "Pneumothorax": "PTx"}


def acc_afp_table(results: dict[str, dict], thresholds: tuple[float, ...], metric: str = "iou") -> str:
    """Rows: T x method; columns: the boxed findings; cells "Acc-AFP"."""
    header = [f"T({metric.upper()})", "method", *(SHORT[f] for f in BOXED_FINDINGS)]
    rows = []
    for t in thresholds:
        for method, table in results.items():
            cells = [table[f][metric][t] for f in BOXED_FINDINGS]
            rows.append([str(t), method, *(MISSING if math.isnan(c["acc"]) else f"{c['acc']:.2f}-{c['afp']:.2f}" for c in cells)])
    return markdown_table(header, rows)


def write_evaluation(run: RunFolder, report: dict[str, Any], markdown: str) -> None:
    """evaluation.json (the report) and evaluation.md (a title and the tables)."""
    write_json(run.evaluation_json, report)
    run.evaluation_md.write_text(f"# Localisation, run {run.name} ({report['images']} boxed images)\n\n{markdown}\n")
