"""Everything that reads or writes bytes, by purpose: ``vocab`` (shared vocabulary), ``inputs``,
``stages`` (what one stage writes and the next reads), ``releases``, ``phantoms``. No torch here."""
