"""Everything that reads or writes bytes: metadata, images, shards. No torch here."""
