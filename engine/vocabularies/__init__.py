"""Bundled label vocabularies, one JSON file each; load them with ``engine.vocab.load_vocabulary(name)``."""
